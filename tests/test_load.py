"""Load: a few hundred small renders across two workers, one restarted in the middle.

Every task finishes exactly once with exactly one object. Prints throughput figures (not asserted).
"""

from __future__ import annotations

import time

from celery import Celery

from tests.support import videos_in, wait_for

COUNT = 200


def test_hundreds_of_renders_across_two_workers_with_a_restart(start_worker, producer: Celery, s3, bucket):
    tiny = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
    first = start_worker()
    second = start_worker()
    started = time.monotonic()
    sent = [
        producer.send_task("tasks.render", kwargs={"prompt": f"frame {i}", "seed": i, **tiny}, queue="render")
        for i in range(COUNT)
    ]
    # Restart one worker in the middle of the run (SIGTERM: it hands the render it is denoising back
    # to the queue at its next step, or finishes it when denoising is done, and exits).
    wait_for(lambda: sum(r.ready() for r in sent) >= COUNT // 3, 600, "a third of the renders")
    assert first.stop() == 0
    restarted = start_worker()

    results = [r.get(timeout=600) for r in sent]
    elapsed = time.monotonic() - started

    assert sorted(r["seed"] for r in results) == list(range(COUNT))
    keys = {r["key"] for r in results}
    assert len(keys) == COUNT
    objects = [o.object_name for o in videos_in(s3, bucket)]
    assert sorted(objects) == sorted(keys)  # exactly one object per task, none extra
    logs = [first.log, second.log, restarted.log]
    handed_back = first.log.count("the task goes back to the queue")
    assert handed_back <= 1 and "goes back to the queue" not in second.log + restarted.log
    # each rendered once, and the one render the stopped worker may have handed back started again
    assert sum(log.count(": render tiny-wan:") for log in logs) == COUNT + handed_back
    by_worker = {
        w: sum(r["worker"] == w for r in results) for w in (first.hostname, second.hostname, restarted.hostname)
    }
    assert all(by_worker.values()), by_worker
    print(
        f"\n{COUNT} renders on 2 workers (one restarted) in {elapsed:.1f}s: {COUNT / elapsed * 60:.0f}/min; {by_worker}"
    )
