"""FastVideo 0.2.1 without an accelerator: the CPU-compatibility layer (tests, demos, tiny-wan).

FastVideo has a ``CpuPlatform`` but three gaps stop a render on a machine with no GPU
(FIELD_NOTES.md), and a fourth stops its Ray executor. This module closes them, and nothing else:

1. ``fastvideo.distributed.parallel_state.get_local_torch_device`` maps every platform that is
   not CUDA/NPU to ``"mps"``. Many modules bind that function by name at import time, so it is
   closed by giving the one function object a CPU body (its ``__code__``), which every importer
   shares.
2. ``CpuPlatform`` has no ``get_attn_backend_cls`` (the base returns ``""``); it gets one that
   names FastVideo's own Torch-SDPA backend, which runs on CPU.
3. ``pipelines/stages/denoising.py`` hard-codes ``target_dtype = torch.bfloat16`` and casts the
   transformer's inputs to it. That module alone gets a view of ``torch`` whose ``bfloat16`` is
   ``float32``; with fp32 weights (``CPU_LOAD_OPTIONS``) autocast is then off by FastVideo's own rule.
4. ``CpuPlatform.ray_device_key`` is ``""``, and FastVideo's Ray executor refuses such a platform
   ("does not support ray"). It becomes ``"GPU"`` (``RAY_DEVICE_KEY``): the resource of FastVideo's
   placement-group bundles and actors, which the engine declares as logical slots when it starts Ray
   on a CPU (``tasks.engines.fastvideo_ray``). Only Ray's scheduler reads the key.

It also supplies the load options a CPU needs (``CPU_LOAD_OPTIONS``: fp32 precisions, no CPU
offload or pinned memory, autocast off), under FastVideo's own option names.

Reaching FastVideo's spawned worker: the mp executor starts its worker with ``spawn``, a fresh
interpreter that imports fastvideo from scratch, so patches made here in the pool child do not
carry over. ``tasks.engines.fastvideo_worker`` replaces the executor's worker entry point with
its own (pickled by reference, so the spawned child imports this project); that entry applies
``apply()`` in the child when ``RENDERFARM_FASTVIDEO_CPU=1`` is in its environment, which
``FastVideoEngine`` sets only when ``accelerator_present()`` is false. Ray's worker processes
(FastVideo's Ray actors) inherit that variable and apply the layer in Ray's setup hook
(``tasks.engines.fastvideo_ray.setup_worker``). On a GPU machine nothing in this module runs.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

__all__ = ["CPU_ENV", "CPU_LOAD_OPTIONS", "accelerator_present", "apply", "applied"]

log = logging.getLogger("renderfarm.fastvideo.cpu")

# Set in the environment of FastVideo's spawned workers when (and only when) the CPU layer is on.
CPU_ENV = "RENDERFARM_FASTVIDEO_CPU"

# ``VideoGenerator.from_pretrained`` options for a CPU, under FastVideo's own names
# (FastVideoArgs fields; the *_precision ones are PipelineConfig fields it routes there).
CPU_LOAD_OPTIONS: dict[str, Any] = {
    "dit_cpu_offload": False,
    "dit_layerwise_offload": False,
    "text_encoder_cpu_offload": False,
    "image_encoder_cpu_offload": False,
    "vae_cpu_offload": False,
    "pin_cpu_memory": False,
    "disable_autocast": True,
    "dit_precision": "fp32",
    "vae_precision": "fp32",
    "vae_decode_precision": "fp32",
    "text_encoder_precisions": ("fp32",),
}

_SDPA_BACKEND = "fastvideo.attention.backends.sdpa.SDPABackend"
# The Ray resource FastVideo's placement group asks for, one per worker; on CPU the engine declares that
# many logical slots with ray.init(num_gpus=...) (tasks.engines.fastvideo_ray).
RAY_DEVICE_KEY = "GPU"
_applied = False


def accelerator_present() -> bool:
    """True when torch sees a CUDA (or ROCm) device or Apple MPS: then this layer stays off."""
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def applied() -> bool:
    return _applied


def apply() -> None:
    """Close the three CPU gaps in this process (idempotent). Refuses to run beside an accelerator."""
    global _applied
    if _applied:
        return
    if accelerator_present():
        raise RuntimeError("the FastVideo CPU-compatibility layer must not be applied where an accelerator is present")
    _local_device_is_cpu()
    _cpu_platform_has_sdpa()
    _denoising_runs_in_fp32()
    _cpu_platform_has_a_ray_device_key()
    _sequence_parallel_warmup_on_cpu()
    _applied = True
    os.environ[CPU_ENV] = "1"
    log.info("FastVideo CPU-compatibility layer applied in pid %d", os.getpid())


def _local_device_is_cpu() -> None:
    from fastvideo.distributed import parallel_state

    def cpu_device() -> Any:  # its code replaces get_local_torch_device's body: keep it self-contained
        import torch

        return torch.device("cpu")

    parallel_state.get_local_torch_device.__code__ = cpu_device.__code__


def _cpu_platform_has_sdpa() -> None:
    from fastvideo.platforms.cpu import CpuPlatform

    def get_attn_backend_cls(cls: type, selected_backend: Any, head_size: int, dtype: Any) -> str:
        return _SDPA_BACKEND

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign,assignment]


class _TorchWithFp32Bfloat16(types.ModuleType):
    """``torch`` as the denoising stage sees it on CPU: ``torch.bfloat16`` is ``torch.float32``."""

    def __init__(self) -> None:
        import torch

        super().__init__("torch")
        self.__dict__["_torch"] = torch
        self.__dict__["bfloat16"] = torch.float32

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_torch"], name)


def _cpu_platform_has_a_ray_device_key() -> None:
    from fastvideo.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = RAY_DEVICE_KEY


def _sequence_parallel_warmup_on_cpu() -> None:
    """With several ranks (``NUM_GPUS`` > 1) the pipeline primes NCCL's sequence-parallel all-to-all
    after loading, with CUDA tensors and ``torch.cuda.synchronize``. On the CPU (gloo) there is
    nothing to prime: skipped. The all-to-all itself runs at the first denoising step."""
    from fastvideo.pipelines import composed_pipeline_base

    def skipped(device: Any = None) -> None:
        log.info("sequence-parallel warm-up skipped on the CPU (it primes NCCL)")

    composed_pipeline_base.warmup_sequence_parallel_communication = skipped  # type: ignore[assignment]


def _denoising_runs_in_fp32() -> None:
    from fastvideo.pipelines.stages import denoising

    if not isinstance(denoising.torch, _TorchWithFp32Bfloat16):
        denoising.torch = _TorchWithFp32Bfloat16()  # type: ignore[assignment]
