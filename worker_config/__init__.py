"""The farm's configuration: settings and the Celery configuration derived from them.

- ``settings``: the one place that reads the environment (``get_broker_settings()`` for
  producers, ``get_settings()`` for workers).
- ``celery_config``: queue names, priorities, and the Celery configuration of the app
  (``app_config``) and of a worker (``celery_config``).

The bottom layer: imported by everything (the producer's face in ``tasks``, the pipeline, the
engines, the worker process, the command line), it imports nothing else of this project.
"""
