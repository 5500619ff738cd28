"""``renderfarm api``: an OpenAI-compatible videos API in front of the queue (issue 18).

Any OpenAI SDK pointed at it (``base_url=http://host:8000/v1``) renders on the farm:
``client.videos.create``, ``retrieve``, ``list``, ``delete`` (cancels), ``download_content`` and
``create_and_poll``. The gateway is stateless: a video is a Celery task (its id is the task id),
its record lives in Redis, its MP4 and poster in S3; any number of replicas serve the same farm.

- ``settings``: what the gateway reads (the broker's settings, its keys file, its models, its limits).
- ``keys``: API keys, stored hashed; a request's key names its owner.
- ``videos``: the OpenAI request to a render request (every problem at once), a render's state to a
  video object.
- ``records``: the videos' records in Redis (one per video, one sorted index per owner).
- ``quotas``: each key's rate and concurrency quota, counted in Redis.
- ``errors``: OpenAI's error object, and which failures mean what (Redis away: 503).
- ``guard``: what every request passes through first: its id, its log line, its body's deadline, its errors.
- ``app``: the FastAPI application: routes, body limits; Redis calls off the event loop.
- ``server``: uvicorn with a deadline on each request's headers and a cap on connections.
"""
