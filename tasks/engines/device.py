"""Which device a worker renders on, and why not CUDA when CUDA is unusable.

``DEVICE=auto`` (the default): CUDA when torch can use it; the CPU only for the built-in
``tiny-wan``. A real model on a worker whose CUDA is unusable (a driver too old for the torch
build, no device visible to the container, a CPU-only torch) is a broken GPU host, not a reason to
render for hours on the CPU and report healthy: the worker stops at start with the diagnosis
(``cuda_diagnosis``: driver version, torch's CUDA version, ``CUDA_VISIBLE_DEVICES``, and what torch
itself says). ``DEVICE=cuda``: CUDA or stop, whatever the model. ``DEVICE=cpu``: the CPU, on
purpose. Both engines render on ``choose_device(settings)``; the self-check and ``renderfarm
doctor`` ask it too, so all three say the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.engines.tiny_wan import TINY_MODELS
from tasks.errors import FatalWorkerError

if TYPE_CHECKING:
    from worker_config.settings import Settings

__all__ = ["choose_device", "cuda_usable", "cuda_diagnosis", "driver_version"]

_DRIVER_FILE = Path("/proc/driver/nvidia/version")
CPU_MODELS = TINY_MODELS  # built in, made for the CPU


def cuda_usable() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, or None where no driver is visible."""
    try:
        words = _DRIVER_FILE.read_text().split()
    except OSError:
        words = []
    for word in words:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..."
        if word[:1].isdigit() and word.count(".") >= 1:
            return word
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def cuda_diagnosis() -> str:
    """Why torch cannot use CUDA here, in one line: torch's build, the driver, the visible devices."""
    import torch

    parts = []
    if torch.version.cuda:
        parts.append(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}")
    else:
        parts.append(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    driver = driver_version()
    parts.append(
        f"NVIDIA driver {driver}" if driver else "no NVIDIA driver visible (on Docker: `--gpus all` with the NVIDIA "
        "container toolkit; compose: a `deploy.resources.reservations.devices` entry for the GPU)"
    )  # fmt: skip
    parts.append(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    if torch.version.cuda:
        try:
            torch.cuda.init()
            parts.append(f"{torch.cuda.device_count()} device(s) visible")
        except Exception as exc:  # noqa: BLE001 - torch's own reason is the diagnosis
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            parts.append(f"torch says: {said}")
    return "; ".join(parts)


def choose_device(settings: Settings) -> str:
    """``"cuda"`` or ``"cpu"``; ``FatalWorkerError`` with the diagnosis when CUDA is needed but unusable."""
    if settings.DEVICE == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if settings.DEVICE == "auto" and settings.MODEL_ID in CPU_MODELS:
        return "cpu"
    why = (
        "DEVICE=cuda" if settings.DEVICE == "cuda"
        else f"MODEL_ID={settings.MODEL_ID} is a real model, which renders on a GPU"
    )  # fmt: skip
    raise FatalWorkerError(
        f"{why}, but CUDA is unusable here: {cuda_diagnosis()}. Fix the GPU host, or set DEVICE=cpu to render on "
        "the CPU on purpose (slow: minutes to hours per video)"
    )
