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

``render_handed_back``: a render whose worker is shutting down stopped and is given back to its
queue, its checkpoint saved (``tasks.pipeline.render``). The worker counts it with the renders
given back (``reason`` ``shutdown``); its queues stay as they are. Receivers get ``sender`` (the
task), ``queue`` and ``step`` (the denoising step it stopped after, or None).

``denoised``: a render computed denoising steps (``steps``, sent after each step). Summed over a
render's deliveries against what it needs, it shows what interruptions cost.

``checkpointed``: a checkpoint event (``tasks.pipeline.checkpoints``): ``outcome`` is ``written``
(with ``nbytes`` and ``seconds``), ``skipped`` (due while the last one was still being saved),
``failed`` (storage refused or was down: the render went on), ``resumed`` (with ``steps``, the
steps it saved), or ``ignored`` (with ``reason``: ``mismatch``, ``damaged``, ``unreadable``).

``render_cancelled``: a render stopped on a cancel and was marked ``REVOKED``
(``tasks.pipeline.cancelling.mark_revoked``): in its run (it then ends with ``Ignore``, which
Celery's signals do not tell from other ends), or in buffer mode by the background thread just
before its upload. Receivers get ``sender`` (the task) and ``task_id``. A queued render discarded
by Celery itself is Celery's ``task_revoked``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "render_cancelled", "render_encoded", "render_given_back", "render_handed_back", "render_stored", "denoised",
    "checkpointed",
]  # fmt: skip

render_encoded = Signal(name="render_encoded")
render_stored = Signal(name="render_stored")
render_cancelled = Signal(name="render_cancelled")
render_given_back = Signal(name="render_given_back")
render_handed_back = Signal(name="render_handed_back")
denoised = Signal(name="denoised")
checkpointed = Signal(name="checkpointed")
