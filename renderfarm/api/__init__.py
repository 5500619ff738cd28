"""``renderfarm api``: an OpenAI-compatible videos API in front of the queue (issue 18).

Any OpenAI SDK pointed at it (``base_url=http://host:8000/v1``) renders on the farm:
``client.videos.create``, ``retrieve``, ``list``, ``delete`` (cancels), ``download_content`` and
``create_and_poll``. The gateway is stateless: a video is a Celery task (its id is the task id),
its record lives in Redis, its MP4 and poster in S3; any number of replicas serve the same farm.

- ``settings``: what the gateway reads (the broker's settings, its keys file, its models).
- ``keys``: API keys, stored hashed; a request's key names its owner.
- ``videos``: the OpenAI request to a render request, a render's state to a video object.
- ``records``: the videos' records in Redis (one per video, one sorted index per owner).
- ``app``: the FastAPI application: routes, OpenAI-style errors, request ids, body limits.
"""
