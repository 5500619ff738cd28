"""Contract with the installed fastvideo: every name the engine passes, and every hook it patches, exists.

A FastVideo upgrade that renames an option, a request field or a patched function fails here,
loudly, instead of being ignored (FastVideo routes unknown from_pretrained kwargs into a
catch-all) or failing inside a worker.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from worker_config.settings import Settings

fastvideo = pytest.importorskip("fastvideo", reason="fastvideo is not installed: run scripts/install-fastvideo.sh")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_load_option_is_a_fastvideo_args_or_pipeline_config_field():
    from fastvideo.configs.pipelines.base import PipelineConfig
    from fastvideo.fastvideo_args import FastVideoArgs

    from tasks.engines.fastvideo_engine import LOAD_OPTION_NAMES, load_options

    known = field_names(FastVideoArgs) | field_names(PipelineConfig)
    assert LOAD_OPTION_NAMES <= known, sorted(LOAD_OPTION_NAMES - known)
    for cpu in (False, True):
        for settings in (Settings(), Settings(FASTVIDEO_PRECISION="bf16", DISTRIBUTED_EXECUTOR_BACKEND="ray")):
            assert set(load_options(settings, cpu)) <= LOAD_OPTION_NAMES
    # The precisions are PipelineConfig fields; all else is a FastVideoArgs field of the same name.
    precisions = {name for name in LOAD_OPTION_NAMES if name.endswith(("_precision", "_precisions"))}
    assert precisions <= field_names(PipelineConfig)
    assert LOAD_OPTION_NAMES - precisions <= field_names(FastVideoArgs)


def test_settings_values_are_ones_fastvideo_accepts():
    from fastvideo.api.schema import EngineConfig
    from fastvideo.utils import PRECISION_TO_TYPE

    fastvideo_backends = typing.get_args(typing.get_type_hints(EngineConfig)["execution_backend"])
    ours = typing.get_args(Settings.model_fields["DISTRIBUTED_EXECUTOR_BACKEND"].annotation)
    assert set(ours) == set(fastvideo_backends) == {"mp", "ray"}
    precisions = set(typing.get_args(Settings.model_fields["FASTVIDEO_PRECISION"].annotation)) - {"auto"}
    assert precisions <= set(PRECISION_TO_TYPE)


def test_the_attention_backends_are_fastvideos_own_names():
    from fastvideo import envs
    from fastvideo.platforms.interface import AttentionBackendEnum

    (names,) = [
        typing.get_args(a)
        for a in typing.get_args(Settings.model_fields["FASTVIDEO_ATTENTION_BACKEND"].annotation)
        if a is not type(None)
    ]
    assert set(names) <= set(AttentionBackendEnum.__members__), sorted(
        set(names) - set(AttentionBackendEnum.__members__)
    )
    assert "FASTVIDEO_ATTENTION_BACKEND" in envs.environment_variables  # read by FastVideo from the environment


def test_what_the_step_channel_patches_still_exists():
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
    from fastvideo.pipelines.stages.denoising import DenoisingStage
    from fastvideo.worker.gpu_worker import Worker
    from fastvideo.worker.multiproc_executor import MultiprocExecutor, WorkerMultiprocProc
    from fastvideo.worker.ray_distributed_executor import RayDistributedExecutor

    # The denoising loop reports through its progress bar, one update() per step.
    assert "progress_bar" in DenoisingStage.__dict__
    assert "progress_bar.update()" in inspect.getsource(DenoisingStage.forward)
    # Both executors' workers run Worker.execute_forward; both executors define execute_forward.
    assert "execute_forward" in Worker.__dict__
    assert "execute_forward" in MultiprocExecutor.__dict__ and "execute_forward" in RayDistributedExecutor.__dict__
    # An answer (not an exception) comes back to the owner with its extra dict intact.
    busy_loop = inspect.getsource(WorkerMultiprocProc.worker_busy_loop)
    assert "self.worker.execute_forward(" in busy_loop and '"extra": extra' in busy_loop
    assert "extra" in field_names(ForwardBatch)


def test_what_the_denoising_state_relies_on_still_holds():
    """tasks/engines/fastvideo_state.py: where the loop's state is reached, and how a resume skips steps."""
    from fastvideo.models.schedulers.scheduling_flow_unipc_multistep import FlowUniPCMultistepScheduler
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
    from fastvideo.pipelines.stages.denoising import DenoisingStage, DmdDenoisingStage

    forward = inspect.getsource(DenoisingStage.forward)
    # The loop reads the batch's latents once, before it; skips an iteration while `interrupt` is
    # true; and its latents after a step are the scheduler step's output.
    assert "latents = batch.latents" in forward
    assert "if hasattr(self, 'interrupt') and self.interrupt:\n                    continue" in forward
    assert "latents = self.scheduler.step(noise_pred, t, latents" in forward
    # The timesteps come from the batch (set by the timestep stage, which ran set_timesteps before).
    assert "timesteps = batch.timesteps" in forward and "set_timesteps" not in forward
    # The worker finds the pool process's files by the output path it sees on its batch.
    assert {"output_path", "latents", "generator"} <= field_names(ForwardBatch)
    # Wan's scheduler keeps its state on the object (captured generically), its step as a method.
    assert "step" in FlowUniPCMultistepScheduler.__dict__ and "set_timesteps" in FlowUniPCMultistepScheduler.__dict__
    # Not covered (docs/reliability.md#checkpoints): FastWan's DMD loop is its own, without scheduler.step.
    assert "forward" in DmdDenoisingStage.__dict__
    assert "self.scheduler.step(" not in inspect.getsource(DmdDenoisingStage.forward)


def test_every_request_field_exists_in_the_request_schema_and_sampling_params():
    from fastvideo.api.sampling_param import SamplingParam
    from fastvideo.api.schema import GenerationRequest, OutputConfig, SamplingConfig

    from tasks.engines.fastvideo_engine import generation_request

    spec = {"prompt": "p", "negative_prompt": "", "num_frames": 9, "height": 64, "width": 64, "fps": 8,
            "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 1, "model": "tiny-wan"}  # fmt: skip
    request = generation_request(spec, output_path="/tmp/x.mp4")  # type: ignore[arg-type]
    assert set(request) <= field_names(GenerationRequest)
    assert set(request["sampling"]) <= field_names(SamplingConfig)
    assert set(request["sampling"]) <= field_names(SamplingParam)  # where FastVideo copies them to
    assert set(request["output"]) <= field_names(OutputConfig)
    assert request["output"]["return_frames"] is False  # never ask for frames we do not use


def test_the_generation_api_the_engine_uses_exists_and_is_current():
    from fastvideo import VideoGenerator
    from fastvideo.api.results import GenerationResult

    assert callable(VideoGenerator.from_pretrained) and callable(VideoGenerator.generate)
    assert "request" in inspect.signature(VideoGenerator.generate).parameters
    assert {"video_path", "generation_time", "peak_memory_mb"} <= field_names(GenerationResult)
    assert callable(VideoGenerator.shutdown)


def test_fastvideo_writes_its_videos_through_the_imageio_the_mp4_writer_replaces(tmp_path):
    import imageio
    import numpy as np
    from fastvideo.entrypoints import video_generator

    from tasks.engines import fastvideo_mp4

    assert video_generator.imageio is imageio or fastvideo_mp4.installed()
    source = inspect.getsource(video_generator.VideoGenerator._generate_single_video)
    assert 'imageio.mimsave(output_path, frames, fps=batch.fps, format="mp4")' in source
    fastvideo_mp4.install()
    fastvideo_mp4.install()  # idempotent
    assert fastvideo_mp4.installed() and video_generator.imageio.imwrite is imageio.imwrite  # the rest: imageio's
    frames = [np.full((32, 48, 3), i * 20, dtype=np.uint8) for i in range(6)]  # FastVideo's frames: a list
    video_generator.imageio.mimsave(tmp_path / "v.mp4", frames, fps=12, format="mp4")
    import av

    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height, stream.frames) == ("h264", 48, 32, 6)
        assert stream.average_rate == 12
    video_generator.imageio.mimsave(tmp_path / "a.gif", frames, duration=0.1)  # not an MP4: imageio writes it
    assert (tmp_path / "a.gif").read_bytes()[:3] == b"GIF"


def test_the_hooks_the_cpu_layer_and_the_worker_entry_patch_still_exist():
    from fastvideo.distributed import parallel_state
    from fastvideo.pipelines.stages import denoising
    from fastvideo.platforms.cpu import CpuPlatform
    from fastvideo.platforms.interface import Platform
    from fastvideo.worker.multiproc_executor import WorkerMultiprocProc

    assert parallel_state.get_local_torch_device.__code__.co_freevars == ()
    assert denoising.torch.__name__ == "torch"
    assert "target_dtype = torch.bfloat16" in inspect.getsource(denoising.DenoisingStage.forward)
    assert hasattr(Platform, "get_attn_backend_cls")
    assert "get_attn_backend_cls" not in CpuPlatform.__dict__  # the gap the CPU layer closes is still open
    assert isinstance(WorkerMultiprocProc.__dict__["worker_main"], staticmethod)
    assert "WorkerMultiprocProc.worker_main" in inspect.getsource(WorkerMultiprocProc.make_worker_process)
    import fastvideo.attention.backends.sdpa as sdpa

    assert hasattr(sdpa, "SDPABackend")


def test_what_the_engines_ray_path_relies_on_still_holds():
    ray = pytest.importorskip("ray", reason="ray is not installed: run scripts/install-fastvideo.sh")
    from fastvideo.platforms.interface import Platform
    from fastvideo.worker import ray_utils
    from fastvideo.worker.ray_distributed_executor import RayDistributedExecutor

    from tasks.engines import fastvideo_ray
    from tasks.engines.fastvideo_cpu import RAY_DEVICE_KEY

    # FastVideo skips its own ray.init when Ray is already up: the engine's instance is the one used.
    assert "if ray.is_initialized():" in inspect.getsource(ray_utils.initialize_ray_cluster)
    # On CPU the device key names an accelerator resource that Ray hands out ids for.
    assert hasattr(Platform, "ray_device_key")
    assert "get_accelerator_ids()[device_key]" in inspect.getsource(ray_utils.RayWorkerWrapper.get_node_and_gpu_ids)
    assert RAY_DEVICE_KEY in ray._private.accelerators.get_all_accelerator_resource_names()
    # 0.2.1's executor lacks exactly the two methods complete_executor() supplies.
    fastvideo_ray.complete_executor()
    assert not RayDistributedExecutor.__abstractmethods__
    assert "worker_process_setup_hook" in inspect.signature(ray.runtime_env.RuntimeEnv).parameters
    # The address and the wait the engine settles (tasks/engines/fastvideo_ray.py, points 6 and 7): FastVideo's
    # get_ip() reads FASTVIDEO_HOST_IP first, its placement group asks for node:<get_ip()>, it waits through the
    # module-level _wait_until_pg_ready that start() replaces, and its workers' address is their own get_ip().
    from fastvideo import envs, utils

    assert "FASTVIDEO_HOST_IP" in envs.environment_variables
    assert "host_ip = envs.FASTVIDEO_HOST_IP" in inspect.getsource(utils.get_ip)
    cluster = inspect.getsource(ray_utils.initialize_ray_cluster)
    assert 'placement_group_specs[0][f"node:{current_ip}"]' in cluster and "current_ip = get_ip()" in cluster
    assert "_wait_until_pg_ready(current_placement_group)" in cluster
    assert "return get_ip()" in inspect.getsource(ray_utils.RayWorkerWrapper.get_node_ip)
    assert "FASTVIDEO_HOST_IP" in RayDistributedExecutor.WORKER_SPECIFIC_ENV_VARS  # never copied to the workers
    assert "for worker in self.workers:" in inspect.getsource(RayDistributedExecutor.shutdown)
