"""The render pipeline: the body of ``tasks.render``, stage by stage, in the order the stages run.

- ``render``: ``run``, the body; it calls the stages below in order.
- ``s1_validate``: the request checked and resolved, its object key computed.
- ``s2_admit``: cancelled while it waited? delivered too often (``MAX_DELIVERIES``)?
- ``s3_lookup``: is the video stored already (asked in the background while the render starts)?
- ``s4_generate``: the engine renders: progress, cancel at a step, one more try on out-of-memory.
- ``s5_encode``: the frames become an MP4 and its metadata.
- ``s6_spool``: the MP4 waits on local disk until it is stored.
- ``s7_upload``: to storage now (queue mode) or in the background (buffer mode).
- ``s8_result``: the result object.
- ``s9_notify``: the webhook delivery queued (``webhook_delivery``: the ``tasks.deliver_webhook`` task).

What the stages share: ``progress`` (stages, steps and timings, published in the background),
``storage`` (the bucket), ``resources`` (this process's store, spool and limits), ``checkpoints``
(a render's denoising saved and found again: used by stage 4, deleted by stage 7), ``stopping``
(should this render stop now, and why: ``cancelling``, or the worker shutting down) and ``events``
(the signals the worker listens to).

Runs in worker pool processes only. It may import the engines, the producer's face and the
configuration; only the worker process (``tasks.worker``) imports it.
"""
