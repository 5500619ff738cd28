"""The GPU smoke check, one command and no network: ``make gpu-smoke`` (``python -m bench.gpu_smoke``).

1. Builds a random-weight checkpoint. On ``--device cuda``: Wan2.1-T2V-1.3B's transformer and VAE,
   whole, and a text encoder as wide as umt5-xxl (4096) with 2 of its 24 layers and a small
   vocabulary (stated in the table's heading). On ``--device cpu``: tiny-wan's shapes. The same
   builder (``tasks.engines.tiny_wan.build_checkpoint``) and the same local-path loading as a real model.
2. Starts a real redis-server and S3 endpoint on loopback, then one real Celery worker per row
   (prefork, one pool child holding the model): diffusers; FastVideo's mp executor with the
   allocator the worker chooses (expandable segments off) and with ``expandable_segments:True`` set
   by the operator; FastVideo's Ray executor where ray is installed. Each row: one untimed warm-up
   render and one timed render through the queue, and the same request called directly on the
   same engine in this process (no queue), for the queue's overhead.
3. The out-of-memory path, on FastVideo's mp worker: an oversized request while memory is short
   (on CUDA another process holds all but ``--oom-free-mb`` of the GPU; on the CPU the address space
   of FastVideo's worker is capped with prlimit, as the tests do). It must end in one more try and
   then ``RenderOutOfMemory`` (or succeed on that try), with no redelivery and no reload: the same
   processes serve the next render.
4. Checkpoints (``checkpoint`` row): the diffusers worker saving its denoising state after every
   step it may (``CHECKPOINT_EVERY_S`` tiny; a save still running when the next is due is skipped):
   the state's size and the seconds per save from the worker's own log lines, and the seconds per
   denoising step against the ``diffusers`` row (whose short renders save none); then the state of
   the real shapes (Wan2.1-1.3B at 480x832x81, Wan2.2-TI2V-5B at 704x1280x121: latents, two model
   outputs, the last sample) made on the device and saved from this process, phase by phase.
5. Prints one table, and writes it with the raw figures under ``--out`` (``table.md``,
   ``results.json``); ``--write-docs`` also puts it in docs/gpu.md with the date and hardware.

Each row runs in a process of its own under a time limit (``--row-timeout``; ``bench.smoke_rows``):
a row that hangs is killed with everything it started, reported "timed out after N s", and the
next row runs. ``--budget`` bounds the whole run, so that the table is always written inside a lent
GPU's command limit: a row the budget leaves no time for is reported "not run". The defaults fit
a lent GPU (docs/gpu.md): 240 s a row and 540 s in all on CUDA; 300 s and 1200 s on the CPU.

Exit status 0 when every row that ran did what it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.smoke_rows import run_rows

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("validating", "encoding_prompt", "denoising", "decoding", "encoding", "uploading")

# Wan2.1-T2V-1.3B (its transformer and VAE configs as published), with a 2-layer text encoder.
WAN21_1_3B = {
    "text_encoder": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64,
                     "relative_attention_num_buckets": 32},
    "transformer": {"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
                    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "rope_max_seq_len": 1024},
    "vae": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "temperal_downsample": [False, True, True]},
    "flow_shift": 3.0,
    "dtype": "bfloat16",
}  # fmt: skip
SHAPES = {  # name: (what the table says, the recipe; None: tiny-wan's)
    "wan2.1-1.3b": ("Wan2.1-T2V-1.3B's transformer and VAE; text encoder 4096 wide, 2 of umt5-xxl's 24 layers",
                    WAN21_1_3B),
    "tiny": ("tiny-wan's shapes", None),
}  # fmt: skip
DEFAULT_SHAPES = {"cuda": "wan2.1-1.3b", "cpu": "tiny"}
# The request each row renders, and the out-of-memory path's oversized one, per device.
REQUESTS = {
    "cuda": ({"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 4},
             {"height": 720, "width": 1280, "num_frames": 81, "num_inference_steps": 4}),
    "cpu": ({"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4},
            {"height": 512, "width": 512, "num_frames": 65, "num_inference_steps": 1}),
}  # fmt: skip
ROWS = {  # name: the worker's settings
    "diffusers": {"ENGINE": "diffusers"},
    "fastvideo-mp": {"ENGINE": "fastvideo", "DISTRIBUTED_EXECUTOR_BACKEND": "mp"},
    "fastvideo-mp-expandable": {"ENGINE": "fastvideo", "DISTRIBUTED_EXECUTOR_BACKEND": "mp",
                                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "fastvideo-ray": {"ENGINE": "fastvideo", "DISTRIBUTED_EXECUTOR_BACKEND": "ray"},
}  # fmt: skip
OOM_ROW = "out-of-memory"
CHECKPOINT_ROW = "checkpoint"
# The denoising state of a Wan UniPC render between two steps, by the latent shape of real renders
# (float32 latents; UniPC of order 2 keeps two model outputs and the last sample beside them).
REAL_STATES = {"Wan2.1-1.3B 480x832x81": (1, 16, 21, 60, 104), "Wan2.2-TI2V-5B 704x1280x121": (1, 48, 31, 44, 80)}
# Per device: seconds a row may take, and the whole run (checkpoint and table included).
ROW_TIMEOUT_S = {"cuda": 240.0, "cpu": 300.0}
BUDGET_S = {"cuda": 540.0, "cpu": 1200.0}
PROMPT = "a red car on a city street at night"


@dataclass
class Row:
    name: str
    ok: bool = False
    outcome: str = "not run"
    allocator: str = ""
    hand_over: str = ""
    load_s: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    end_to_end_s: float | None = None
    direct_s: float | None = None
    peak_memory_mb: float | None = None
    memory_source: str | None = None

    @property
    def overhead_s(self) -> float | None:
        if self.end_to_end_s is None or self.direct_s is None:
            return None
        return self.end_to_end_s - self.direct_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--rows", default=",".join([*ROWS, OOM_ROW, CHECKPOINT_ROW]), help="which rows, comma-separated"
    )
    parser.add_argument("--steps", type=int, help="denoising steps per render (default: the device's request)")
    parser.add_argument("--size", help="WxHxF of each render (default: the device's request)")
    parser.add_argument("--shapes", choices=tuple(SHAPES), help="the checkpoint's shapes (default: by device)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct calls (no overhead column)")
    parser.add_argument("--oom-free-mb", type=int, default=512, help="CUDA: GPU memory left free for the OOM row")
    parser.add_argument("--work", type=Path, default=Path("/tmp/renderfarm-gpu-smoke"), help="checkpoint, logs")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-smoke")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/gpu.md")
    parser.add_argument(
        "--row-timeout",
        type=float,
        metavar="S",
        help=f"seconds a row may take before it is killed (default: {ROW_TIMEOUT_S})",
    )
    parser.add_argument(
        "--budget", type=float, metavar="S", help=f"seconds for the whole run; 0 = no limit (default: {BUDGET_S})"
    )
    parser.add_argument("--direct", help=argparse.SUPPRESS)  # one row's direct call, in a process of its own
    parser.add_argument("--row", nargs=3, metavar=("NAME", "JOB", "RECORD"), help=argparse.SUPPRESS)  # one row
    args = parser.parse_args(argv)
    if args.direct:
        direct(json.loads(args.direct))
        return 0
    if args.row:
        return run_one(args.row[0], json.loads(args.row[1]), Path(args.row[2]))
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    if unknown := set(rows) - {*ROWS, OOM_ROW, CHECKPOINT_ROW}:
        parser.error(f"unknown rows {sorted(unknown)}; allowed: {', '.join([*ROWS, OOM_ROW, CHECKPOINT_ROW])}")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"--device cuda, but torch {torch.__version__} sees no usable CUDA device; use --device cpu on a "
              "machine without a GPU", file=sys.stderr)  # fmt: skip
        return 2
    request, oversized = (dict(r) for r in REQUESTS[args.device])
    if args.steps:
        request["num_inference_steps"] = oversized["num_inference_steps"] = args.steps
    if args.size:
        request.update(zip(("width", "height", "num_frames"), map(int, args.size.split("x")), strict=True))
    shapes = args.shapes or DEFAULT_SHAPES[args.device]
    started = time.perf_counter()
    row_timeout = args.row_timeout or ROW_TIMEOUT_S[args.device]
    budget = BUDGET_S[args.device] if args.budget is None else args.budget
    deadline = time.monotonic() + budget - 10 if budget else None  # 10 s kept for the table
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    about = describe_machine(args.device)
    print(f"machine: {about}; each row at most {row_timeout:.0f} s, the run {f'{budget:.0f} s' if budget else 'unbounded'}",
          flush=True)  # fmt: skip
    with stack(args.work, args.device) as st:  # first: importing ``tasks`` reads the broker's address
        model, build_s = checkpoint(shapes, args.device, args.work)
        print(f"checkpoint: {model} ({SHAPES[shapes][0]}), built in {build_s:.1f}s", flush=True)
        st.use_model(model)

        def command_for(name: str, record: Path) -> list[str]:
            job = {"request": request, "oversized": oversized, "device": args.device, "work": str(args.work),
                   "env": st.base_env, "seed": 7000 + 100 * rows.index(name), "direct": not args.no_direct,
                   "oom_free_mb": args.oom_free_mb}  # fmt: skip
            return [sys.executable, "-m", "bench.gpu_smoke", "--row", name, json.dumps(job), str(record)]

        def cleared(name: str) -> None:  # a killed row's queued or unacknowledged renders must not reach the next
            st.bench.redis.client.flushall()

        records = run_rows(rows, command_for, args.work / "rows", row_timeout, deadline, cleared,
                           lambda name, record: print(f"{name}: {record['outcome']}", flush=True), cwd=ROOT)  # fmt: skip
    results = [Row(**{k: v for k, v in record.items() if k in Row.__dataclass_fields__}) for record in records]
    table = render_table(results, about, shapes, build_s, request, oversized, time.perf_counter() - started)
    print(table, flush=True)
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": about, "model": model, "request": request, "oversized": oversized,
         "rows": [{**asdict(r), "overhead_s": r.overhead_s} for r in results]}, indent=2))  # fmt: skip
    if args.write_docs:
        from bench.stack import replace_section

        replace_section(ROOT / "docs" / "gpu.md", f"gpu-smoke-{args.device}", table)
    return 0 if all(r.ok for r in results) else 1


def describe_machine(device: str) -> str:
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
        parts.append(f"CUDA {torch.version.cuda}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
            parts.append(f"driver {smi.stdout.strip().splitlines()[0]}")
    else:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        parts.insert(0, f"{cpu.group(1) if cpu else 'CPU'} x {os.cpu_count()}")
    return ", ".join(parts)


def checkpoint(shapes: str, device: str, work: Path) -> tuple[str, float]:
    """The checkpoint's directory (built once into ``work``, its modules made on ``device``) and the
    seconds the build took (0 if it was there)."""
    from tasks.engines.tiny_wan import RECIPES, TINY_WAN_ID, WanRecipe, ensure_built

    recipe_args = SHAPES[shapes][1]
    recipe = RECIPES[TINY_WAN_ID] if recipe_args is None else WanRecipe(**recipe_args)  # type: ignore[arg-type]
    target = work / f"wan-{shapes}-random"
    if (target / "model_index.json").is_file():
        return str(target), 0.0
    started = time.perf_counter()
    ensure_built(target, recipe, device=device)
    if device == "cuda":  # the modules are gone with the build: give their memory back to the GPU
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    return str(target), time.perf_counter() - started


class Stack:
    """Redis, S3 and the settings every worker of this run shares (in the run's own process)."""

    def __init__(self, bench_stack: Any, device: str) -> None:
        self.bench = bench_stack
        self.base_env = {"DEVICE": device, "WORKER_MAX_TASKS_PER_CHILD": "0", "HF_HUB_OFFLINE": "1"}

    def use_model(self, model: str) -> None:
        self.base_env["MODEL_ID"] = model
        os.environ.update(self.base_env)


@contextlib.contextmanager
def stack(work: Path, device: str) -> Iterator[Stack]:
    from bench.stack import local_stack

    with local_stack(model_cache=work / "cache") as bench_stack:
        yield Stack(bench_stack, device)


class RowRun:
    """One row, in the process ``run_rows`` started for it: where it writes, and its record so far."""

    def __init__(self, row: Row, job: dict[str, Any], record: Path) -> None:
        self.row, self.job, self.record = row, job, record
        self.work, self.device, self.base_env = Path(job["work"]), job["device"], job["env"]
        self._seed = int(job["seed"])

    def seed(self) -> int:
        self._seed += 1
        return self._seed

    def doing(self, what: str) -> None:
        """Write the record with what the row is doing now (what a timed-out row's report names)."""
        self.row.outcome = what
        self.save()

    def save(self) -> None:
        part = self.record.with_name(self.record.name + ".part")
        part.write_text(json.dumps(asdict(self.row)))
        part.rename(self.record)  # whole or not at all: the row may be killed at any moment


def run_one(name: str, job: dict[str, Any], record: Path) -> int:
    """``--row``: one row, in this process (``run_rows`` kills it and what it started when its time is up)."""
    run = RowRun(Row(name), job, record)
    row = run.row
    try:
        if name == OOM_ROW:
            out_of_memory(run, job["request"], job["oversized"], job["oom_free_mb"])
        elif name == CHECKPOINT_ROW:
            checkpoint_row(run, job["request"])
        elif name == "fastvideo-ray" and importlib.util.find_spec("ray") is None:
            row.outcome = "not run: ray is not installed (its 79 MB wheel does not fit the 64 MiB bundle)"
            row.ok = True
        else:
            render_row(run, job["request"], job["direct"])
    except Exception as exc:  # noqa: BLE001 - one failed row is reported, the next still runs
        row.ok, row.outcome = False, f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    run.save()
    return 0


def render_row(run: RowRun, request: dict[str, Any], direct: bool) -> None:
    row = run.row
    env = {**run.base_env, **ROWS[row.name]}
    if direct:  # first, so the worker's model and this process's are never in memory at once
        run.doing("the direct call (its own process: load, then two renders)")
        row.direct_s = direct_call(env, request, run.seed)
    with worker(run, env):
        run.doing("the warm-up render through the queue")
        send(request, run.seed())  # warm-up: kernels, allocator pools, first-use imports
        run.doing("the timed render through the queue")
        began = time.perf_counter()
        result = send(request, run.seed())
        row.end_to_end_s = time.perf_counter() - began
        take_result(row, result)
        row.ok, row.outcome = True, "rendered"
        if row.name.startswith("fastvideo-mp") and run.device == "cuda" and "cuda tensor" not in row.hand_over:
            row.ok, row.outcome = False, f"rendered, but the start-up check did not pass a CUDA tensor: {row.hand_over}"


def out_of_memory(run: RowRun, request: dict[str, Any], oversized: dict[str, Any], oom_free_mb: int) -> None:
    """FastVideo's mp worker, an oversized request while memory is short, then a render that fits."""
    import psutil

    row = run.row
    env = {**run.base_env, **ROWS["fastvideo-mp"]}
    with worker(run, env) as proc:
        run.doing("the warm-up render through the queue")
        send(request, run.seed())  # warm: the allocator holds what a normal render needs
        [child] = psutil.Process(proc.proc.pid).children()
        [model_proc] = [p for p in child.children() if "multiprocessing.spawn" in " ".join(p.cmdline())
                        and "resource_tracker" not in " ".join(p.cmdline())]  # fmt: skip
        began = time.perf_counter()
        run.doing("the oversized render, short of memory")
        with short_of_memory(run.device, model_proc, oom_free_mb) as how:
            try:
                send(oversized, run.seed())
                ending = "succeeded on its one more try" if "trying once more" in proc.log else "did not run out"
            except Exception as exc:  # the expected ending is an error
                if type(exc).__name__ != "RenderOutOfMemory":
                    raise
                ending = f"RenderOutOfMemory ({str(exc).split(': ask for')[0][:160]})"
        row.end_to_end_s = time.perf_counter() - began
        retries = proc.log.count("freeing memory and trying once more")
        run.doing("the render after the out-of-memory one")
        after = send(request, run.seed())
        same = after["worker_pid"] == child.pid and model_proc.is_running() and proc.log.count("engine loaded") == 1
        lost = "WorkerLostError" in proc.log or "SIGQUIT" in proc.log
        row.ok = ending != "did not run out" and retries == 1 and same and not lost
        row.outcome = (f"{describe(oversized)} with {how}: {ending}; {retries} more try; next render by the same "
                       f"processes without reload: {'yes' if same else 'NO'}; redelivered: {'YES' if lost else 'no'}")  # fmt: skip


_SAVED = re.compile(
    r"checkpoint of \S+ at step \d+ of \d+ saved: ([\d.]+) MB in ([\d.]+)s \(to host ([\d.]+)s, "
    r"encoding ([\d.]+)s, upload ([\d.]+)s\)"
)


def checkpoint_row(run: RowRun, request: dict[str, Any]) -> None:
    """The diffusers worker saving after every step it may; then the real shapes' state saved from here."""
    row = run.row
    env = {**run.base_env, **ROWS["diffusers"], "CHECKPOINT_EVERY_S": "0.001"}
    with worker(run, env) as proc:
        run.doing("the warm-up render through the queue")
        send(request, run.seed())
        since = len(proc.log)
        run.doing("the timed render through the queue, a checkpoint after every step it may")
        began = time.perf_counter()
        result = send(request, run.seed())
        row.end_to_end_s = time.perf_counter() - began
        take_result(row, result)
        log = proc.log[since:]
    saves = [tuple(map(float, m)) for m in _SAVED.findall(log)]
    skipped = log.count("skipped: the last one is still being saved")
    steps = request["num_inference_steps"]
    parts = []
    if saves:
        med = [statistics.median(column) for column in zip(*saves, strict=True)]
        parts.append(f"{len(saves)} saves of {med[0]:.1f} MB, {med[1]:.2f} s each in the background (to host "
                     f"{med[2]:.3f}, encoding {med[3]:.3f}, upload {med[4]:.3f}), {skipped} skipped")  # fmt: skip
    baseline = run.record.with_name("diffusers.json")  # the diffusers row's record: its renders save none
    with contextlib.suppress(OSError, ValueError, KeyError):
        before = json.loads(baseline.read_text())["stages"]["denoising"]
        delta = (row.stages["denoising"] - before) / steps
        parts.append(f"denoising {delta:+.3f} s a step against the diffusers row (no saves)")
    for name, shape in REAL_STATES.items():
        run.doing(f"saving the state of {name} from this process")
        parts.append(f"{name}: {real_state_save(shape, run.device)}")
    row.ok = bool(saves)
    row.outcome = "; ".join(parts) if saves else f"no checkpoint saved: {'; '.join(parts)}"


def real_state_save(shape: tuple[int, ...], device: str) -> str:
    """A state of ``shape`` made on ``device``, saved from this process: seconds per phase."""
    import torch

    from tasks.engines import DenoisingState
    from tasks.pipeline.checkpoints import Identity, decode, encode
    from tasks.pipeline.storage import VideoStore
    from worker_config.settings import get_settings

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    names = ("latents", "scheduler.last_sample", "scheduler.model_outputs.0", "scheduler.model_outputs.1")
    tensors = {name: torch.randn(shape, device=device) for name in names}
    spec = {"num_inference_steps": 50}
    identity = Identity("renders/00/gpu-smoke.mp4", "gpu-smoke", "", "diffusers", spec)
    store = VideoStore(get_settings())
    t0 = now()
    state = DenoisingState(10, 50, {n: t.clone() for n, t in tensors.items()}, {"kind": "gpu-smoke"})
    t1 = now()
    host = state.to_host()
    t2 = now()
    data = encode(identity, host)
    t3 = now()
    store.put_bytes("checkpoints/00/gpu-smoke.ckpt", data)
    t4 = now()
    decode(store.read_small("checkpoints/00/gpu-smoke.ckpt", 2**31) or b"", identity)
    t5 = now()
    store.remove("checkpoints/00/gpu-smoke.ckpt")
    del tensors, state, host
    return (
        f"{len(data) / 1e6:.1f} MB: copy on the device {t1 - t0:.3f} s (the render's only wait), to host "
        f"{t2 - t1:.3f}, encoding {t3 - t2:.3f}, upload {t4 - t3:.3f}, read back {t5 - t4:.3f}"
    )


@contextlib.contextmanager
def short_of_memory(device: str, model_proc: Any, free_mb: int) -> Iterator[str]:
    """CUDA: another process holds all but ``free_mb`` of the GPU. CPU: the model process's address
    space capped a little above what it maps now (the tests' way)."""
    if device == "cpu":
        limit = model_proc.memory_info().vms + 768 * 2**20
        subprocess.run(["prlimit", f"--pid={model_proc.pid}", f"--as={limit}:unlimited"], check=True)
        try:
            yield "its worker's address space capped at +768 MiB"
        finally:
            subprocess.run(["prlimit", f"--pid={model_proc.pid}", "--as=unlimited"], check=True)
        return
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(free_mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        held = hog.stdout.readline().strip() if hog.stdout else ""
        yield f"another process holding {held} MiB of the GPU ({free_mb} MiB left free)"
    finally:
        if hog.stdin:
            hog.stdin.close()
        hog.wait(60)


HOG = """
import sys, torch
free, _ = torch.cuda.mem_get_info()
keep = int(sys.argv[1]) * 2**20
block = torch.empty(max(0, free - keep), dtype=torch.uint8, device="cuda")
print(block.numel() // 2**20, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def worker(run: RowRun, env: dict[str, str]) -> Iterator[Any]:
    """The row's worker, its log written live to ``--work``/<row>.log (kept when the row is killed)."""
    from renderfarm.localstack import WorkerProcess

    row = run.row
    run.doing("starting the worker (the engine loads)")
    proc = WorkerProcess(row.name, {**os.environ, **env}, run.work / f"{row.name}.log",
                         ("--without-mingle", "--without-gossip"))  # fmt: skip
    try:
        proc.wait_ready(900)
        log = proc.log
        if m := re.search(r"engine loaded: .* in ([\d.]+)s", log):
            row.load_s = float(m.group(1))
        if m := re.search(r"CUDA allocator: (.+)", log):  # the worker's choice (tasks.worker.allocator)
            line = m.group(1)
            row.allocator = "unset" if " unset" in line else line.split()[0].split("=", 1)[1]
            row.allocator += " (operator)" if "from the environment" in line else ""
        if m := re.search(r"Tensor hand-over\W+(.+)", log):  # the start-up check (tasks.worker.selfcheck)
            row.hand_over = m.group(1).strip()
        yield proc
    finally:
        proc.stop(120)


def send(request: dict[str, Any], seed: int) -> dict[str, Any]:
    from tasks import render

    result: dict[str, Any] = render.delay(prompt=PROMPT, seed=seed,
                                          negative_prompt="", **request).get(timeout=1800)  # fmt: skip
    return result


def take_result(row: Row, result: dict[str, Any]) -> None:
    row.stages = {k: v for k, v in result["timings"].items() if k in (*STAGES, "total")}
    row.peak_memory_mb, row.memory_source = result.get("peak_memory_mb"), result.get("memory_source")


def direct_call(env: dict[str, str], request: dict[str, Any], seed: Any) -> float:
    """The same render called on the engine in a process of its own with ``env``: render, encode (if
    frames), store. Seconds of the second of two calls (the first warms up, as in the worker)."""
    job = {"request": request, "seeds": [seed(), seed()]}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--direct", json.dumps(job)], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"the direct call exited with {done.returncode}: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def direct(job: dict[str, Any]) -> None:
    """``--direct``: in this process, settings from the environment; prints ``{"seconds": ...}``."""
    import tempfile

    from tasks.engines.holder import load_engine
    from tasks.keys import object_key
    from tasks.pipeline.s5_encode import encode_mp4, sha256_file, to_uint8_frames
    from tasks.pipeline.storage import VideoStore
    from worker_config.settings import get_settings

    settings = get_settings()
    engine = load_engine(settings)
    store = VideoStore(settings)
    store.ensure_bucket()
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in job["seeds"]:
            spec = {"prompt": PROMPT, "negative_prompt": "", "guidance_scale": 5.0, "fps": 16,
                    "model": settings.MODEL_ID, "seed": seed, **job["request"]}  # fmt: skip
            began = time.perf_counter()
            output = engine.render(spec, lambda *a: None)
            path = output.video_path or encode_mp4(to_uint8_frames(output.frames), spec["fps"], Path(tmp) / "d.mp4")  # type: ignore[arg-type]
            store.put("direct/" + object_key(spec), path, {"sha256": sha256_file(path)})  # type: ignore[arg-type]
            seconds = time.perf_counter() - began
            path.unlink(missing_ok=True)
    engine.close()
    print(json.dumps({"seconds": seconds}), flush=True)


def describe(request: dict[str, Any]) -> str:
    return f"{request['width']}x{request['height']} x {request['num_frames']} frames, {request['num_inference_steps']} steps"


def render_table(
    rows: list[Row], about: str, shapes: str, build_s: float, request: dict[str, Any], oversized: dict[str, Any],
    seconds: float,
) -> str:  # fmt: skip
    def f(value: float | None, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {about}; {seconds / 60:.1f} min in all.",
        f"Model: random weights, {SHAPES[shapes][0]} (built in {build_s:.0f} s). Each row: {describe(request)}, the second render "
        "after a warm-up; seconds from the worker's own stage timings. Direct: the same request on the same "
        "engine in one process, without the queue (render, encode, store). Overhead: end to end through the "
        f"queue minus direct. Out-of-memory row: {describe(oversized)}.",
        "",
        "| row | ok | load s | prompt s | denoise s (per step) | decode s | MP4 s | store s | worker total s "
        "| end to end s | direct s | queue overhead s | peak MB (where) | CUDA allocator | tensor hand-over | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.stages
        steps = request["num_inference_steps"]
        denoise = f"{f(s.get('denoising'))} ({f(s['denoising'] / steps, 3)})" if "denoising" in s else ""
        peak = f"{f(r.peak_memory_mb, 0)} ({r.memory_source})" if r.peak_memory_mb is not None else ""
        ok = ("skipped" if r.ok else "NO") if r.outcome.startswith("not run") else "yes" if r.ok else "NO"
        lines.append(
            f"| {r.name} | {ok} | {f(r.load_s, 1)} | {f(s.get('encoding_prompt'))} | {denoise} "
            f"| {f(s.get('decoding'))} | {f(s.get('encoding'))} | {f(s.get('uploading'))} | {f(s.get('total'))} "
            f"| {f(r.end_to_end_s)} | {f(r.direct_s)} | {f(r.overhead_s)} | {peak} | {r.allocator} | {r.hand_over} | {r.outcome} |"
        )
    overheads = [r.overhead_s for r in rows if r.overhead_s is not None]
    if overheads:
        lines += ["", f"Median queue overhead: {statistics.median(overheads):.3f} s per render."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
