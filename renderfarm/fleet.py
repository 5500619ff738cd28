"""``renderfarm workers``: which workers are up, the model each serves, what each is doing."""

from __future__ import annotations

from typing import Any

__all__ = ["survey"]


def survey(app: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """One entry per worker that answered: name, model, engine, queues, processed count and active renders."""
    from renderfarm.progress import describe

    pings = app.control.inspect(timeout=timeout).ping() or {}
    if not pings:
        return []
    names = sorted(pings)
    inspect = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
    active = inspect.active() or {}
    stats = inspect.stats() or {}
    infos: dict[str, Any] = {}
    for reply in app.control.broadcast(
        "renderfarm_info", reply=True, timeout=timeout, destination=names, limit=len(names)
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
        workers.append({
            "worker": name,
            "model": info.get("model", "?"),
            "engine": info.get("engine", "?"),
            "queues": info.get("queues", []),
            "pid": (stats.get(name) or {}).get("pid"),
            "processed": sum(total.values()) if isinstance(total, dict) else 0,
            "status": "busy" if renders else "idle",
            "active": renders,
        })  # fmt: skip
    return workers
