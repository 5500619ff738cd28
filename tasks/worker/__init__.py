"""The worker process: what runs a render worker around the pipeline, from start to exit.

- ``boot``: loaded by Celery when a worker starts (the app's ``include``); connects the rest.
- ``lifecycle``: settings and configuration at start, the engine loaded once per pool process
  (after the ``selfcheck``, with ``mp_in_pool`` and the ``allocator`` set up) and released at exit.
- ``selfcheck``: the start-up check and the engine plan (``python -m tasks.worker.selfcheck``).
- ``mp_in_pool``: lets a prefork pool process start multiprocessing children (FastVideo's mp executor).
- ``allocator``, ``memory``: glibc's allocator for repeated renders, and trimming between them.
- ``lease``: renews the Redis leases of the tasks this worker holds.
- ``metrics``, ``logs``, ``info``: Prometheus metrics, log lines with the task id, ``renderfarm_info``.
- ``healthcheck``: the container health check (``python -m tasks.worker.healthcheck``).

The top layer of ``tasks``: it may import the pipeline, the engines, the producer's face and the
configuration; nothing imports it but Celery (``include``), the command line and the tests.
"""
