"""The import graph: producers import only the face, layers import downwards, and nothing imports in a circle.

The layers, bottom to top (``tasks/__init__.py`` says the same in words):

0. ``worker_config``: settings and Celery configuration;
1. the producer's face: ``tasks`` and its top-level modules;
2. ``tasks.engines``;  3. ``tasks.pipeline``;  4. ``tasks.worker``;
5. the tools: ``renderfarm`` (the command line) and ``bench``.

A module may import its own layer and the layers below it, never one above. Every import counts,
also those inside functions and under ``TYPE_CHECKING`` (grimp reads them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grimp
import pytest

from tests.support import ROOT

PACKAGES = ("tasks", "worker_config", "renderfarm", "bench")
LAYERS = ("worker_config", "the producer's face (tasks)", "tasks.engines", "tasks.pipeline", "tasks.worker", "tools")
WORKER_ONLY = ("tasks.engines", "tasks.pipeline", "tasks.worker")
# Worker settings that would stop a worker (each is invalid): a producer never reads them.
BAD_WORKER_SETTINGS = {"RENDER_TIME_LIMIT_S": "1", "ENGINE": "banana", "MINIO_BUCKET": "Not A Bucket"}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def layer_of(module: str) -> int:
    if module.split(".")[0] == "worker_config":
        return 0
    for index, package in enumerate(WORKER_ONLY, start=2):
        if module == package or module.startswith(package + "."):
            return index
    return 1 if module.split(".")[0] == "tasks" else 5


def describe(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    line = graph.get_import_details(importer=importer, imported=imported)[0]
    return f"{importer}:{line['line_number']} `{line['line_contents']}`"


def test_layers_import_downwards_only(graph):
    upward = [
        f"{describe(graph, importer, imported)}: {LAYERS[layer_of(importer)]} imports {LAYERS[layer_of(imported)]}"
        for importer in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if layer_of(imported) > layer_of(importer)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or graph.direct_import_exists(importer=module, imported=module):
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_itself_in_a_circle(graph):
    cycles = import_cycles(graph)
    shown = []
    for cycle in cycles:
        chain = graph.find_shortest_chain(importer=cycle[0], imported=cycle[1]) or ()
        back = graph.find_shortest_chain(importer=cycle[1], imported=cycle[0]) or ()
        shown.append(" -> ".join([*chain, *back[1:]]))
    assert not cycles, "import circles:\n" + "\n".join(shown)


def test_the_cycle_check_finds_a_circle():
    # The check itself can fail: a graph with a -> b -> c -> a has one circle, of three modules.
    graph = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_importing_tasks_does_not_import_torch_or_the_engines():
    code = (
        "import sys, tasks\n"
        "worker_only = ('torch', 'diffusers', 'transformers', 'numpy', 'av', 'prometheus_client', 'psutil')\n"
        "heavy = sorted(m for m in worker_only if m in sys.modules)\n"
        "print(tasks.render.name, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tasks.render []"


PRODUCER = """
import json, sys
import tasks
hook = "https://hooks.example.com/render?token=tok-5ecret"
image = "data:image/png;base64," + "A" * 400_000
sent = tasks.render.apply_async(kwargs={"prompt": "a red fox", "webhook_url": hook, "image": image},
                                priority=tasks.PRIORITIES["high"])
here = tasks.render.apply(kwargs={"prompt": "a red fox"})  # not a worker: no pipeline, a clear error
print(json.dumps({
    "id": sent.id,
    "worker_modules": sorted(m for m in sys.modules if m.startswith(WORKER_ONLY)),
    "eager": [here.state, str(here.result)],
}))
""".replace("WORKER_ONLY", repr(WORKER_ONLY))


def test_a_producer_sends_renders_whatever_the_worker_settings(redis_server):
    """Only REDIS_URL, and worker settings a worker would refuse: the producer neither reads nor needs them."""
    redis_server.client.flushall()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "REDIS_URL": redis_server.url, **BAD_WORKER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", PRODUCER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["worker_modules"] == []
    assert report["eager"][0] == "FAILURE" and "runs only in a render worker" in report["eager"][1]
    queued = [json.loads(body) for body in redis_server.client.lrange("render", 0, -1)]  # priority high: "render"
    assert [message["headers"]["id"] for message in queued] == [report["id"]]
    assert queued[0]["headers"]["task"] == "tasks.render"
    # What Celery shows of the arguments (events, Flower, logs): the webhook URL without its token.
    shown = queued[0]["headers"]["kwargsrepr"]
    assert "tok-5ecret" not in shown and "'webhook_url': 'https://hooks.example.com/render?...'" in shown
    # An inline image shows as its type and length: events and Flower never carry its 400 KB twice.
    assert "'image': 'data:image/png;base64,... (400,022 characters)'" in shown and len(shown) <= 1024


def test_the_same_settings_stop_a_worker_at_start_naming_them(worker_env):
    env = {**worker_env, **BAD_WORKER_SETTINGS}
    command = ["celery", "-A", "tasks", "worker", "--pool=solo", "--without-mingle", "--without-gossip"]
    out = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("renderfarm worker: invalid settings:"), out.stderr[-2000:]
    assert all(name in error for name in ("ENGINE", "MINIO_BUCKET")), error
    assert "Traceback" not in out.stderr
