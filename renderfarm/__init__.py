"""Tools around the render farm's queue: the ``renderfarm`` command, a waiting helper for producers,
and a local stack (Redis, an S3 endpoint and a worker) for demos and tests."""

from renderfarm.progress import wait_for_render

__all__ = ["wait_for_render"]
