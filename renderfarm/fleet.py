"""``renderfarm workers`` and ``models``: which workers are up, what each consumes and serves, what each is doing."""

from __future__ import annotations

from typing import Any

__all__ = ["clashes", "models", "survey", "waiting_per_queue"]


def survey(app: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """One entry per worker name that answered: name, whether it renders, model, engine, queues, processed
    count, active renders, and ``answers``: how many workers answer under that name (more than 1: a clash).

    ``queues`` are what the worker consumes now, from Celery's own ``active_queues`` (what Flower's
    worker page shows under "Queues"); ``renders`` is true for a worker that consumes a render queue.
    """
    from renderfarm.progress import describe
    from worker_config.routing import is_render_queue

    replies = app.control.ping(timeout=timeout) or []  # a list: two workers of one name answer twice
    answers: dict[str, int] = {}
    for reply in replies:
        for name in reply:
            answers[name] = answers.get(name, 0) + 1
    if not answers:
        return []
    names = sorted(answers)
    limit = sum(answers.values())
    inspect = app.control.inspect(destination=names, timeout=timeout, limit=limit)
    active = inspect.active() or {}
    stats = inspect.stats() or {}
    consuming = inspect.active_queues() or {}
    infos: dict[str, Any] = {}
    for reply in app.control.broadcast(
        "renderfarm_info", reply=True, timeout=timeout, destination=names, limit=limit
    ) or []:  # fmt: skip
        infos.update(reply)
    workers = []
    for name in names:
        info = infos.get(name) or {}
        renders = []
        for request in active.get(name) or []:
            result = app.AsyncResult(request["id"])
            progress = result.info if isinstance(result.info, dict) else {}
            kwargs = request.get("kwargs") or {}
            renders.append({
                "id": request["id"],
                "task": request.get("name"),
                "prompt": str(kwargs.get("prompt", ""))[:60],
                "state": result.state,
                "progress": describe(result.state, progress),
            })  # fmt: skip
        total = (stats.get(name) or {}).get("total") or {}
        queues = sorted(q["name"] for q in consuming.get(name) or [] if "name" in q) or info.get("queues", [])
        serves = any(is_render_queue(q) for q in queues)
        workers.append({
            "worker": name,
            "renders": serves,
            "model": info.get("model", "?") if serves else None,
            "engine": info.get("engine", "?") if serves else None,
            "queues": queues,
            "pid": (stats.get(name) or {}).get("pid"),
            "answers": answers[name],
            "processed": sum(total.values()) if isinstance(total, dict) else 0,
            "status": "busy" if renders else "idle",
            "active": renders,
        })  # fmt: skip
    return workers


def clashes(workers: list[dict[str, Any]]) -> list[str]:
    """The worker names that more than one worker answers under (each must have its own ``-n``/``--name``)."""
    return [w["worker"] for w in workers if w.get("answers", 1) > 1]


def waiting_per_queue(client: Any) -> dict[str, int]:
    """Requests waiting in each render queue (``render`` and every ``render.<model>``), all priorities.

    Only the queues' own lists are scanned (``render``, ``render.*``, ``render<sep>*``), never the
    ``renderfarm:*`` keys beside them (cancel flags, the API's records), and read in one pipeline.
    """
    from worker_config.celery_config import PRIORITY_SEP
    from worker_config.routing import RENDER_QUEUE

    lists = [RENDER_QUEUE, *client.scan_iter(match=f"{RENDER_QUEUE}[.{PRIORITY_SEP[0]}]*", count=1000)]
    pipe = client.pipeline(transaction=False)
    for key in lists:
        pipe.llen(key)
    waiting: dict[str, int] = {}
    for key, size in zip(lists, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(size, int) and size:  # not a list (an error): not a queue
            name = (key.decode() if isinstance(key, bytes) else key).split(PRIORITY_SEP)[0]
            waiting[name] = waiting.get(name, 0) + size
    return waiting


def models(app: Any, client: Any, default_model: str | None, timeout: float = 2.0) -> list[dict[str, Any]]:
    """One entry per model the fleet serves or is asked for: its queues, workers and waiting requests.

    A queue with requests waiting and no worker (a model no worker serves, or whose workers are
    all gone) is listed with ``workers: 0`` and the model it is for where the queue name says it.
    """
    from worker_config.routing import RENDER_QUEUE, queue_for

    served: dict[str, dict[str, Any]] = {}
    for worker in survey(app, timeout):
        if not worker["renders"]:
            continue  # a webhook worker serves no model
        entry = served.setdefault(worker["model"], {"queues": set(), "workers": []})
        entry["queues"].update(q for q in worker["queues"] if q == RENDER_QUEUE or q.startswith(f"{RENDER_QUEUE}."))
        entry["workers"].append(worker["worker"])
    if default_model is not None and default_model not in served:
        served[default_model] = {"queues": {RENDER_QUEUE}, "workers": []}
    waiting = waiting_per_queue(client)
    rows: list[dict[str, Any]] = []
    covered: set[str] = set()
    for model, entry in sorted(served.items()):
        queues = sorted(entry["queues"] or {queue_for(model, default_model)})
        rows.append({"model": model, "default": model == default_model, "queues": queues,
                     "workers": len(entry["workers"]), "worker_names": sorted(entry["workers"]),
                     "waiting": sum(waiting.get(q, 0) for q in queues)})  # fmt: skip
        covered.update(queues)
    for queue, count in sorted(waiting.items()):
        if queue not in covered:
            rows.append({"model": None, "default": False, "queues": [queue], "workers": 0, "worker_names": [],
                         "waiting": count})  # fmt: skip
    return rows
