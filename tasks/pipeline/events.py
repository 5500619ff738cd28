"""The pipeline's own signals, for what Celery's task signals cannot see; the worker listens.

``render_encoded``: a render's frames are encoded and dropped (stage 5). The worker gives the
memory they held back to the OS here (``tasks.worker.memory``). Receivers get ``sender`` (the task).

``render_stored``: a render's video reached storage outside its task's run: in
``WORKER_MODE=buffer`` the task hands the upload to a background thread and returns (Celery sends
no ``task_success``); the thread sends this once the object is stored and the result written.
Receivers get ``task_id``, ``kwargs`` (the request) and ``result`` (the result object).

``render_given_back``: a render reached a process with no engine and is given back to its queue
untouched (``tasks.pipeline.stray``). The worker counts it (``tasks.worker.metrics``) and stops
consuming render queues (``tasks.worker.queues``). Receivers get ``sender`` (the task), ``queue``
(the queue it came from) and ``reason`` (``no_engine``).

``render_cancelled``: a render stopped on a cancel and was marked ``REVOKED``
(``tasks.pipeline.cancelling.mark_revoked``): in its run (it then ends with ``Ignore``, which
Celery's signals do not tell from other ends), or in buffer mode by the background thread just
before its upload. Receivers get ``sender`` (the task) and ``task_id``. A queued render discarded
by Celery itself is Celery's ``task_revoked``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["render_cancelled", "render_encoded", "render_given_back", "render_stored"]

render_encoded = Signal(name="render_encoded")
render_stored = Signal(name="render_stored")
render_cancelled = Signal(name="render_cancelled")
render_given_back = Signal(name="render_given_back")
