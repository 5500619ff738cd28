"""No silent CPU fallback: a real model without usable CUDA stops the worker at start with the diagnosis.

This machine has no GPU and a CPU-only torch, which is exactly the broken GPU host of the worst
kind; the CPU is used only for tiny-wan or when ``DEVICE=cpu`` asks for it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks.engines import device
from tasks.errors import FatalWorkerError
from tasks.worker.allocator import CUDA_ALLOC_ENV, cuda_allocator
from tests.support import ROOT
from worker_config.settings import Settings

REAL_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_the_cpu_renders_tiny_wan_or_what_asks_for_it():
    assert device.choose_device(Settings(MODEL_ID="tiny-wan")) == "cpu"
    assert device.choose_device(Settings(MODEL_ID=REAL_MODEL, DEVICE="cpu")) == "cpu"


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        (Settings(MODEL_ID=REAL_MODEL), f"MODEL_ID={REAL_MODEL} is a real model, which renders on a GPU"),
        (Settings(MODEL_ID="tiny-wan", DEVICE="cuda"), "DEVICE=cuda"),
    ],
)
def test_a_worker_that_needs_cuda_without_it_gets_the_diagnosis(settings, why, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(FatalWorkerError) as info:
        device.choose_device(settings)
    text = str(info.value)
    assert text.startswith(f"{why}, but CUDA is unusable here: torch ")
    assert "is a CPU-only build (install a CUDA build of torch)" in text  # this machine's torch: 2.13.0+cpu
    assert "no NVIDIA driver visible" in text and "CUDA_VISIBLE_DEVICES=0" in text
    assert "set DEVICE=cpu to render on the CPU on purpose" in text


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, monkeypatch):
    version = tmp_path / "version"
    version.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)  "
        "Sun Jul 27 07:09:29 UTC 2025\nGCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n"
    )
    monkeypatch.setattr(device, "_DRIVER_FILE", version)
    assert device.driver_version() == "580.65.06"


@pytest.mark.parametrize(
    ("engine", "backend", "given", "expected"),
    [
        ("diffusers", "mp", None, "expandable_segments:True"),
        ("fastvideo", "ray", None, "expandable_segments:True"),
        ("fastvideo", "mp", None, None),  # CUDA IPC: expandable segments would need CAP_SYS_PTRACE
        ("diffusers", "mp", "max_split_size_mb:128", "max_split_size_mb:128"),  # the operator's own wins
    ],
)
def test_the_cuda_allocator_is_chosen_per_engine_and_executor(engine, backend, given, expected, monkeypatch):
    monkeypatch.delenv(CUDA_ALLOC_ENV, raising=False)
    if given is not None:
        monkeypatch.setenv(CUDA_ALLOC_ENV, given)
    said = cuda_allocator(engine, backend)
    assert os.environ.get(CUDA_ALLOC_ENV) == expected
    assert CUDA_ALLOC_ENV in said


def test_a_worker_for_a_real_model_without_cuda_stops_at_start_and_doctor_says_why(start_worker, worker_env):
    worker = start_worker(wait=False, MODEL_ID=REAL_MODEL)
    assert worker.proc.wait(120) == 1
    log = worker.log
    assert "Device: FAILED: MODEL_ID=Wan-AI/Wan2.1-T2V-1.3B-Diffusers is a real model" in log  # the banner
    assert "FATAL: the engine failed to load" in log and "CUDA is unusable here" in log
    assert "is a CPU-only build" in log and "CUDA_VISIBLE_DEVICES=" in log and "DEVICE=cpu" in log
    assert "engine loaded" not in log

    env = {**worker_env, "MODEL_ID": REAL_MODEL}
    command = [sys.executable, "-m", "renderfarm.cli", "doctor"]
    doctor = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert doctor.returncode == 1
    assert "FAIL Device: MODEL_ID=Wan-AI/Wan2.1-T2V-1.3B-Diffusers is a real model" in doctor.stderr
    assert "CUDA is unusable here" in doctor.stderr
