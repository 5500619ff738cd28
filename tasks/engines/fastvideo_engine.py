"""The FastVideo engine: one ``VideoGenerator`` per pool child, rendering straight to an MP4.

- Loaded once with ``VideoGenerator.from_pretrained(path, **load_options(settings))``: every
  option comes from settings and is passed under FastVideo's own name (``LOAD_OPTION_NAMES``;
  ``tests/test_fastvideo_contract.py`` checks them against the installed package).
- Renders with the typed API, ``generate(request)`` (``generate_video`` is deprecated in 0.2.1),
  asking FastVideo to write the MP4 and never to return frames; it writes it with this farm's
  encoder (``tasks.engines.fastvideo_mp4``). The path is read back from the result: FastVideo
  renames on collision (``_1.mp4``). The MP4 is written in a private directory
  inside ``SPOOL_DIR`` so the task can move it into the spool with an atomic rename.
- Without an accelerator, ``tasks.engines.fastvideo_cpu`` closes FastVideo 0.2.1's CPU gaps in
  this process and in FastVideo's workers: the mp executor's spawned worker (via
  ``tasks.engines.fastvideo_worker``) or the Ray executor's actors.
- With ``DISTRIBUTED_EXECUTOR_BACKEND=ray`` the engine owns the Ray instance
  (``tasks.engines.fastvideo_ray``): started before the generator (FastVideo is given Ray's node
  address, and a bounded wait for its placement group: ``RayStartFailed``), its placement group
  released after each generator shutdown, shut down in ``close()``. A failure in a Ray actor reaches
  ``generate`` as an exception (no SIGQUIT on this path): the generator is rebuilt and the error
  raised. A Ray actor that *died* (kernel OOM kill, crash) gets one more try on the rebuilt
  generator, then ``EngineWorkerLost``; the pool child keeps its model and keeps serving.
- Progress, cancel and out-of-memory step by step (``tasks.engines.fastvideo_steps``): FastVideo's
  worker reports each denoising step to this process, which calls the task's progress callback; a
  callback that raises (cancelled, found in storage) stops the worker at the next step, and an
  out-of-memory in the worker comes back as ``EngineOutOfMemory`` (a ``MemoryError``: the task's
  one more try follows) with the worker still loaded. The generator stays as it is in both cases.
- Checkpoints (``denoising``, the engine interface's ``Denoising`` hooks): the state to continue from
  is written beside the render's output before ``generate`` and FastVideo's worker starts its loop
  from it; a state the render wants (a checkpoint due, the worker shutting down) is asked for over
  the step channel and comes back as a file the worker wrote (``tasks.engines.fastvideo_state``,
  ``fastvideo_steps``). With both executors; a render stopped for a shutdown waits for the state
  written where it stopped (``STATE_WAIT_S``) before its error is raised.
- A render interrupted while FastVideo's worker was busy (soft time limit) leaves the executor's
  pipe out of step; the generator is rebuilt before the error is raised. Any other failure inside
  FastVideo's mp worker: it sends SIGQUIT, billiard's handler ends this pool child (after the
  engine is released), Celery sees WorkerLostError and redelivers the task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import psutil

from tasks.engines import (
    Denoising,
    ProgressFn,
    RenderOutput,
    denoising_state,
    fastvideo_ray,
    fastvideo_state,
    fastvideo_steps,
    resolve_model_path,
)
from tasks.engines.conditioning import first_frame
from tasks.engines.device import choose_device
from tasks.engines.second_try import describe_size, with_one_more_try
from tasks.engines.weights import hub_revision
from tasks.errors import EngineNotReady, EngineWorkerLost, FatalWorkerError, RenderError
from tasks.images import ConditioningImage
from worker_config.settings import Settings

__all__ = [
    "FastVideoEngine", "EngineOutOfMemory", "load_options", "generation_request", "LOAD_OPTION_NAMES",
    "REQUEST_SAMPLING_NAMES",
]  # fmt: skip

log = logging.getLogger("renderfarm.fastvideo")

# The from_pretrained options this engine may pass (FastVideoArgs fields, or PipelineConfig
# fields for the precisions), and the request fields it fills (SamplingConfig / SamplingParam).
LOAD_OPTION_NAMES = frozenset({
    "num_gpus", "distributed_executor_backend", "dit_cpu_offload", "dit_layerwise_offload",
    "text_encoder_cpu_offload", "image_encoder_cpu_offload", "vae_cpu_offload", "pin_cpu_memory",
    "use_fsdp_inference", "disable_autocast", "dit_precision", "vae_precision", "vae_decode_precision",
    "VSA_sparsity", "revision", "text_encoder_precisions", "pipeline_config",
})  # fmt: skip
# Built-in models configured in FastVideo like the Hub model whose shapes they have (FastVideo finds a
# Hub model's pipeline configuration by its id; a local directory only by its pipeline's class name,
# which would make tiny-wan-ti2v a Wan2.1 text-to-video model without image conditioning).
CONFIGURED_LIKE = {"tiny-wan-ti2v": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
REQUEST_SAMPLING_NAMES = ("num_frames", "height", "width", "fps", "num_inference_steps", "guidance_scale", "seed")
REQUEST_OUTPUT_NAMES = ("output_path", "save_video", "return_frames")
# How long a render stopped at a step waits for the state FastVideo's worker wrote there.
STATE_WAIT_S = 10.0


def load_options(settings: Settings, cpu: bool) -> dict[str, Any]:
    """``VideoGenerator.from_pretrained`` keyword arguments for these settings."""
    from tasks.engines.fastvideo_cpu import CPU_LOAD_OPTIONS

    options: dict[str, Any] = {
        "num_gpus": settings.NUM_GPUS,
        "distributed_executor_backend": settings.DISTRIBUTED_EXECUTOR_BACKEND,
        "dit_cpu_offload": settings.FASTVIDEO_DIT_CPU_OFFLOAD,
        "text_encoder_cpu_offload": settings.FASTVIDEO_TEXT_ENCODER_CPU_OFFLOAD,
        "vae_cpu_offload": settings.FASTVIDEO_VAE_CPU_OFFLOAD,
        "pin_cpu_memory": settings.FASTVIDEO_PIN_CPU_MEMORY,
        "use_fsdp_inference": settings.FASTVIDEO_USE_FSDP_INFERENCE,
    }
    if settings.FASTVIDEO_PRECISION != "auto":
        options["dit_precision"] = settings.FASTVIDEO_PRECISION
    if settings.FASTVIDEO_TEXT_ENCODER_PRECISION != "auto":  # Wan pipelines have one text encoder
        options["text_encoder_precisions"] = (settings.FASTVIDEO_TEXT_ENCODER_PRECISION,)
    if settings.FASTVIDEO_VSA_SPARSITY is not None:
        options["VSA_sparsity"] = settings.FASTVIDEO_VSA_SPARSITY
    if (revision := hub_revision(settings)) is not None:
        options["revision"] = revision  # FastVideo downloads and loads the Hub model at MODEL_REVISION
    if cpu:
        options.update(CPU_LOAD_OPTIONS)
    if unknown := set(options) - LOAD_OPTION_NAMES:  # keep the contract test's list complete
        raise RuntimeError(f"FastVideo options missing from LOAD_OPTION_NAMES: {sorted(unknown)}")
    return options


def generation_request(spec: dict[str, Any], output_path: Path, image_path: Path | None = None) -> dict[str, Any]:
    """The ``GenerationRequest`` (as a mapping: only these fields count as set) for one render;
    ``image_path``: the first frame of an image-conditioned render, as a file."""
    request = {
        "prompt": spec["prompt"],
        "negative_prompt": spec["negative_prompt"],
        "sampling": {name: spec[name] for name in REQUEST_SAMPLING_NAMES},
        "output": {"output_path": str(output_path), "save_video": True, "return_frames": False},
    }
    if image_path is not None:
        request["inputs"] = {"image_path": str(image_path)}
    return request


def _private_output_dir(spool: Path) -> Path:
    """``SPOOL_DIR/.fastvideo-<pid>-*``: same filesystem as the spool; dirs of dead children are removed."""
    spool.mkdir(parents=True, exist_ok=True)
    for stale in spool.glob(".fastvideo-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".fastvideo-{os.getpid()}-", dir=spool))


class EngineOutOfMemory(MemoryError):
    """FastVideo's worker ran out of memory; it freed what it could and is still loaded (one more try follows)."""


class FastVideoEngine:
    name = "fastvideo"

    def __init__(self, settings: Settings) -> None:
        # FastVideo configures the root logger on import, with a handler on sys.stdout; in a pool
        # child sys.stdout is Celery's logging proxy, so every record loops back and most are lost
        # (this engine's and the lifecycle's own lines included). Celery owns logging here; the
        # spawned worker sets up its own (tasks.engines.fastvideo_worker).
        os.environ.setdefault("FASTVIDEO_CONFIGURE_LOGGING", "0")
        from tasks.engines import fastvideo_cpu, fastvideo_mp4, fastvideo_worker

        self.model_id = settings.MODEL_ID
        self._settings = settings
        self.device = choose_device(settings)
        cpu = self.device == "cpu"
        if cpu and fastvideo_cpu.accelerator_present():
            raise FatalWorkerError(
                "DEVICE=cpu with ENGINE=fastvideo on a host with a GPU: FastVideo renders on the GPU it sees; hide it "
                "with CUDA_VISIBLE_DEVICES= (empty) to render on the CPU, or use ENGINE=diffusers"
            )
        if cpu:
            fastvideo_cpu.apply()
        fastvideo_worker.install()
        fastvideo_mp4.install()  # FastVideo's MP4 written by this farm's encoder, not imageio-ffmpeg
        fastvideo_steps.install_in_owner()
        # Before FastVideo's workers start (spawned or Ray's): they inherit the channel's name.
        self._steps = fastvideo_steps.StepMonitor()
        os.environ[fastvideo_steps.ADDRESS_ENV] = self._steps.name
        if settings.FASTVIDEO_ATTENTION_BACKEND:  # FastVideo reads it from the environment, in its workers too
            os.environ["FASTVIDEO_ATTENTION_BACKEND"] = settings.FASTVIDEO_ATTENTION_BACKEND
        self._path = resolve_model_path(settings)
        self._options = load_options(settings, cpu)
        self._out = _private_output_dir(Path(settings.SPOOL_DIR))
        self._generator: Any = None
        self._sigquit_wrapped = False
        self._ray = settings.DISTRIBUTED_EXECUTOR_BACKEND == "ray"
        try:
            if self._ray:  # FASTVIDEO_HOST_IP: Ray's node address unless the operator set it
                fastvideo_ray.start(settings.NUM_GPUS, cpu, settings.FASTVIDEO_HOST_IP,
                                    settings.FASTVIDEO_RAY_START_TIMEOUT_S)  # fmt: skip
            self.from_pretrained_seconds = self._load()
        except BaseException:
            if self._ray:  # the process exits next (lifecycle): end Ray cleanly first
                fastvideo_ray.stop()
            self._steps.close()
            raise

    def _load(self) -> float:
        from fastvideo import VideoGenerator

        started = time.perf_counter()
        options = dict(self._options)
        if (like := CONFIGURED_LIKE.get(self.model_id)) is not None:
            from fastvideo.registry import get_pipeline_config_cls_from_name

            options["pipeline_config"] = get_pipeline_config_cls_from_name(like)()
        with warnings.catch_warnings():
            # 0.2.1 routes the *_precision options (PipelineConfig fields) through a path it flags
            # as "legacy-only" in favour of from_config; they are still its own names and honoured.
            warnings.filterwarnings("ignore", message=r".*legacy-only kwargs.*", category=DeprecationWarning)
            self._generator = VideoGenerator.from_pretrained(self._path, **options)
        seconds = time.perf_counter() - started
        configured = ""
        if "pipeline_config" in options:
            configured = f"; pipeline_config={type(options['pipeline_config']).__name__} (configured like {like})"
        log.info("FastVideo VideoGenerator.from_pretrained(%s) took %.2fs with %s%s", self._path, seconds,
                 self._options, configured)  # fmt: skip
        return seconds

    def render(
        self, spec: dict[str, Any], progress: ProgressFn, image: ConditioningImage | None = None,
        denoising: Denoising | None = None,
    ) -> RenderOutput:  # fmt: skip
        if self._generator is None:
            raise EngineNotReady("the FastVideo engine was used after it was closed")
        if not self._ray:  # only the mp executor's worker signals its owner
            self._explain_sigquit()
        name = uuid.uuid4().hex
        output = self._out / f"{name}.mp4"
        image_path = None
        if image is not None:  # FastVideo reads the image from a file, in its worker
            image_path = self._out / f"{name}.png"
            first_frame(image, spec["width"], spec["height"]).save(image_path)
        # A saved state to continue from: a file FastVideo's worker finds beside the output (fastvideo_state).
        state = denoising.resume(spec["num_inference_steps"]) if denoising is not None else None
        if state is not None:
            denoising_state.write(state, fastvideo_state.resume_path(output))
        try:
            request = generation_request(spec, output, image_path)
            return self._render(spec, progress, request, denoising)
        finally:
            if image_path is not None:
                image_path.unlink(missing_ok=True)
            for leftover in (fastvideo_state.resume_path(output), *self._out.glob(f"{name}.state-*")):
                leftover.unlink(missing_ok=True)

    def _render(
        self, spec: dict[str, Any], progress: ProgressFn, request: dict[str, Any], denoising: Denoising | None
    ) -> RenderOutput:
        steps = spec["num_inference_steps"]
        progress("encoding_prompt", None, None)
        started = time.perf_counter()

        def attempt() -> Any:
            try:
                return self._generate(request)
            except Exception as exc:  # SoftTimeLimitExceeded included; SystemExit is left alone
                if (stopped := fastvideo_steps.engine_stopped(exc)) is not None:
                    raise self._stopped_by(stopped) from None  # the worker answered: nothing to rebuild
                self._rebuild_after_interrupt()
                raise

        def before_retry(exc: Exception) -> None:
            log.warning("FastVideo's Ray worker died during the render (%s); trying once more on the rebuilt "
                        "generator", exc)  # fmt: skip

        def give_up(exc: Exception) -> Exception:
            rebuilt = self._generator is not None
            return EngineWorkerLost(
                f"FastVideo's Ray worker process died twice rendering {describe_size(spec)}: killed by the kernel "
                "(out of memory?) or crashed (see the worker log). "
                + ("The generator was rebuilt; this worker keeps serving." if rebuilt
                   else "Rebuilding the generator failed too.")
            )  # fmt: skip

        with self._steps.render(progress, denoising, Path(request["output"]["output_path"])):
            result = with_one_more_try(attempt, self._ray_worker_died, before_retry, give_up)
        seconds = time.perf_counter() - started
        if isinstance(result, list):  # one prompt in, one result out; a list means FastVideo fanned out
            result = result[0]
        if self._steps.error is not None:  # asked to stop after the worker's last check: the video goes
            if result.video_path:
                Path(result.video_path).unlink(missing_ok=True)
            raise self._steps.error
        if self._steps.last_step != steps:  # no step reached this process (a pipeline without our hook)
            progress("denoising", steps, steps)
        if not result.video_path or not Path(result.video_path).is_file():
            raise RenderError(f"FastVideo reported no video file (video_path={result.video_path!r})")
        log.info("FastVideo generate took %.2fs (its own generation_time %.2fs)", seconds, result.generation_time or 0)
        peak = fastvideo_steps.last_peak_memory()
        return RenderOutput(
            video_path=Path(result.video_path),
            stats={
                "generate_s": seconds,
                "generation_time": result.generation_time,
                "peak_memory_mb": peak[0] if peak else None,
                "memory_source": peak[1] if peak else None,
            },
        )

    def _stopped_by(self, stopped: fastvideo_steps.EngineStopped) -> BaseException:
        """The error to raise for a forward FastVideo's worker ended early (it is still loaded and in step)."""
        if stopped.kind == "out_of_memory":
            return EngineOutOfMemory(f"out of memory in FastVideo's worker process: {stopped.detail}")
        if self._steps.error is not None:
            # The progress callback's own exception: cancelled, found in storage, or the worker shutting
            # down, which needs the state the worker wrote where it stopped (written before it stopped).
            if not self._steps.settle(STATE_WAIT_S):
                log.warning("FastVideo's worker did not hand over its state within %.0fs", STATE_WAIT_S)
            return self._steps.error
        return RenderError(f"FastVideo's worker stopped the render unasked ({stopped.detail})")

    def _generate(self, request: Any) -> Any:
        if self._generator is None:  # a rebuild after a failure did not load
            raise EngineNotReady("the FastVideo generator could not be rebuilt after a failure (see the worker log)")
        return self._generator.generate(request)

    def _ray_worker_died(self, exc: BaseException) -> bool:
        """With the Ray executor, a dead actor (not an error raised in it) is worth one more try:
        the mp executor's equivalent ends this child and Celery delivers the task again."""
        return self._ray and fastvideo_ray.worker_death(exc) is not None

    def _explain_sigquit(self) -> None:
        """Say in the log why this child is about to exit when FastVideo's worker fails mid-render.

        FastVideo's worker sends SIGQUIT to this process on any exception; billiard's handler (set
        after worker_process_init, so it is wrapped here, at the first render) ends the child, and
        Celery redelivers the task. The handler is wrapped once, from the main thread.
        """
        if self._sigquit_wrapped or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGQUIT)

        def explain(signum: int, frame: Any) -> None:
            log.error(
                "pool child %d got SIGQUIT: FastVideo's worker process failed (its traceback is above). This "
                "child exits; Celery starts a new one and redelivers the task (at most MAX_DELIVERIES times)",
                os.getpid(),
            )
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGQUIT, explain)
        self._sigquit_wrapped = True

    def _rebuild_after_interrupt(self) -> None:
        """Shut down the executor (its worker may still be busy) and load a fresh generator."""
        log.warning("FastVideo render interrupted; rebuilding the generator so the next render starts clean")
        self._shutdown()
        try:
            self._load()
        except Exception:  # the next render then fails loudly with EngineNotReady
            log.exception("rebuilding the FastVideo generator failed")

    def _shutdown(self) -> None:
        generator, self._generator = self._generator, None
        if generator is not None:
            with contextlib.suppress(Exception):
                generator.shutdown()
        if self._ray:  # FastVideo's Ray executor keeps its placement group: free it for the next generator
            with contextlib.suppress(Exception):
                fastvideo_ray.release_placement_groups()

    def close(self) -> None:
        self._shutdown()
        self._steps.close()
        if self._ray:
            fastvideo_ray.stop()
        shutil.rmtree(self._out, ignore_errors=True)
