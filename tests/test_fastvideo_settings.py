"""The FastVideo settings block and the fallback plan (pure functions: no fastvideo, no workers)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tasks.engines.fastvideo_ray import RayStartFailed
from tasks.errors import FatalWorkerError
from tasks.worker.selfcheck import Check, Plan, fallback_after, plan
from worker_config.settings import Settings, SettingsError, get_settings

BROKEN_SHM = Check("/dev/shm", False, "read-only", "use --ipc=host", needed_by_mp=True)
HEALTHY = [Check("PyTorch", True, "2"), Check("/dev/shm", True, "ok"), Check("Multiprocessing", True, "[2, 4, 6]")]
RAY = importlib.util.find_spec("ray") is not None
DIFFUSERS = importlib.util.find_spec("diffusers") is not None
NOT_PLACED = RayStartFailed(
    "FastVideo's Ray executor did not start: ... FastVideo asks for a node at 203.0.113.7 ... Ray's node address is "
    "127.0.0.1 ... Fix: unset FASTVIDEO_HOST_IP"
)


def settings(**env: str) -> Settings:
    return Settings(**env)  # type: ignore[arg-type]


def test_defaults_are_fastvideos_own_defaults():
    s = Settings()
    assert (s.FASTVIDEO_DIT_CPU_OFFLOAD, s.FASTVIDEO_TEXT_ENCODER_CPU_OFFLOAD, s.FASTVIDEO_VAE_CPU_OFFLOAD) == (
        True,
    ) * 3
    assert (s.FASTVIDEO_PIN_CPU_MEMORY, s.FASTVIDEO_USE_FSDP_INFERENCE, s.FASTVIDEO_PRECISION) == (True, False, "auto")
    assert s.engine_fallbacks == ("ray", "diffusers")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ray,diffusers", ("ray", "diffusers")), (" diffusers ", ("diffusers",)), ("none", ()), ("", ())],
)
def test_engine_fallbacks_parse(value, expected):
    assert settings(ENGINE_FALLBACKS=value).engine_fallbacks == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ENGINE_FALLBACKS", "threads", "comma-separated list of 'ray' and 'diffusers'"),
        ("ENGINE_FALLBACKS", "ray,ray", "each at most once"),
        ("FASTVIDEO_PRECISION", "fp8", "Input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
        ("FASTVIDEO_DIT_CPU_OFFLOAD", "maybe", "Input should be a valid boolean"),
        ("DISTRIBUTED_EXECUTOR_BACKEND", "threads", "Input should be 'mp' or 'ray'"),
        ("FASTVIDEO_HOST_IP", "gpu-node-1", r"use an IPv4 or IPv6 address \(Ray's node address\), or leave it unset"),
        ("FASTVIDEO_RAY_START_TIMEOUT_S", "0", "Input should be greater than 0"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match=rf"{name} \(got '{value}'\): .*{message}"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_plan_keeps_the_engine_when_mp_works_or_is_not_needed():
    assert plan(settings(ENGINE="fastvideo"), HEALTHY).engine == "fastvideo"
    chosen = plan(settings(ENGINE="diffusers"), [BROKEN_SHM])
    assert (chosen.engine, chosen.fallback) == ("diffusers", False)
    ray = plan(settings(ENGINE="fastvideo", DISTRIBUTED_EXECUTOR_BACKEND="ray"), [BROKEN_SHM])
    assert (ray.engine, ray.fallback) == ("fastvideo", False)


def test_plan_falls_back_in_the_order_given():
    chosen = plan(settings(ENGINE="fastvideo", ENGINE_FALLBACKS="ray,diffusers"), [BROKEN_SHM])
    if RAY:
        assert (chosen.engine, chosen.settings.DISTRIBUTED_EXECUTOR_BACKEND) == ("fastvideo", "ray")
    else:
        assert chosen.engine == "diffusers" and chosen.settings.ENGINE == "diffusers"
        assert "skipped: ray (the ray package is not installed)" in chosen.reason
    assert chosen.fallback and "--ipc=host" in chosen.reason


def test_plan_without_a_usable_fallback_is_fatal_with_the_fix():
    with pytest.raises(FatalWorkerError, match=r"cannot run in this container \(/dev/shm: read-only\).*--shm-size=8g"):
        plan(settings(ENGINE="fastvideo", ENGINE_FALLBACKS="none"), [BROKEN_SHM])


def test_the_ray_address_is_the_operators_or_unset_and_the_wait_well_under_the_start_up_probe():
    assert Settings().FASTVIDEO_HOST_IP is None and settings(FASTVIDEO_HOST_IP="").FASTVIDEO_HOST_IP is None
    assert settings(FASTVIDEO_HOST_IP="10.0.0.7").FASTVIDEO_HOST_IP == "10.0.0.7"
    assert settings(FASTVIDEO_HOST_IP="fd00::7").FASTVIDEO_HOST_IP == "fd00::7"
    # The start-up probes allow 15 minutes (compose's start_period) and 30 (Kubernetes): tests/test_deploy.py.
    assert Settings().FASTVIDEO_RAY_START_TIMEOUT_S == 120


@pytest.mark.skipif(not DIFFUSERS, reason="the diffusers fallback needs diffusers installed")
def test_a_ray_executor_that_did_not_start_falls_back_as_engine_fallbacks_allows():
    ray = settings(ENGINE="fastvideo", DISTRIBUTED_EXECUTOR_BACKEND="ray")
    chosen = fallback_after(Plan("fastvideo", ray, "configured"), NOT_PLACED)
    assert chosen is not None and (chosen.engine, chosen.settings.ENGINE, chosen.fallback) == ("diffusers",) * 2 + (
        True,
    )
    assert chosen.reason.startswith("FastVideo's Ray executor did not start; fallback to the diffusers engine. Cause: ")
    assert "Ray's node address is 127.0.0.1" in chosen.reason
    # Ray chosen for a broken mp executor: only what ENGINE_FALLBACKS lists after ray.
    mp = settings(ENGINE="fastvideo", ENGINE_FALLBACKS="ray,diffusers")
    after = fallback_after(Plan("fastvideo", mp.model_copy(update={"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}), "", True),
                           NOT_PLACED)  # fmt: skip
    assert after is not None and after.engine == "diffusers"
    # Anything else that stops a load is not a start failure a fallback answers: the caller raises it.
    assert fallback_after(Plan("fastvideo", ray, "configured"), FileNotFoundError("model_index.json")) is None


@pytest.mark.parametrize("fallbacks", ["none", "ray"])
def test_a_ray_executor_that_did_not_start_without_an_allowed_fallback_is_fatal_with_the_diagnosis(fallbacks):
    ray = settings(ENGINE="fastvideo", DISTRIBUTED_EXECUTOR_BACKEND="ray", ENGINE_FALLBACKS=fallbacks)
    with pytest.raises(
        FatalWorkerError,
        match=rf"Fix: unset FASTVIDEO_HOST_IP ENGINE_FALLBACKS={fallbacks} allows no "
        r"other engine here \(ENGINE_FALLBACKS=diffusers renders with the diffusers engine instead\)",
    ):
        fallback_after(Plan("fastvideo", ray, "configured"), NOT_PLACED)
    # Ray as the mp executor's fallback, listed last: nothing after it.
    mp = settings(ENGINE="fastvideo", ENGINE_FALLBACKS="diffusers,ray").model_copy(
        update={"DISTRIBUTED_EXECUTOR_BACKEND": "ray"}
    )
    with pytest.raises(FatalWorkerError, match="ENGINE_FALLBACKS=diffusers,ray allows no other engine"):
        fallback_after(Plan("fastvideo", mp, "", True), NOT_PLACED)


def test_doctor_command_runs_the_checks_on_demand():
    env = {**os.environ, "ENGINE": "diffusers"}
    out = subprocess.run(
        [sys.executable, "-m", "tasks.worker.selfcheck"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Multiprocessing OK: [2, 4, 6]" in out.stdout and "PyTorch: " in out.stdout and "/dev/shm: " in out.stdout
    assert "Verdict: OK" in out.stdout


def test_ray_instance_declares_logical_gpus_only_without_an_accelerator():
    from tasks.engines.fastvideo_ray import SETUP_HOOK, init_options

    cpu, gpu = init_options(2, cpu=True), init_options(2, cpu=False)
    assert cpu["num_gpus"] == 2 and "num_gpus" not in gpu  # with a GPU, Ray counts the real devices
    for options in (cpu, gpu):
        assert (options["address"], options["include_dashboard"], options["num_cpus"]) == ("local", False, 0)
        assert options["runtime_env"] == {"worker_process_setup_hook": SETUP_HOOK}
