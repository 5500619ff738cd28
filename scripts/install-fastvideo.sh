#!/usr/bin/env bash
# Build .venv-fastvideo: the project plus FastVideo 0.2.1, for the FastVideo engine and its tests.
#
# Idempotent and non-interactive. Kept apart from .venv (torch 2.13.0+cpu) because FastVideo's
# import dependency torchvision only works here with torch 2.14.1 / torchvision 0.29.1.
#   scripts/install-fastvideo.sh            # creates or updates .venv-fastvideo
#   VENV=/some/where scripts/install-fastvideo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-fastvideo}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints-fastvideo.txt"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=(pip_install -c "$CONSTRAINTS")
pip_install() {
    # pip warns once per package about this machine's local index mirrors: drop those lines only.
    local rc=0
    "$VENV/bin/python" -m pip install --quiet --progress-bar off "$@" \
        2> >(grep -v "is ignored: it is neither" >&2) || rc=$?
    return "$rc"
}

# 1. torch first, pinned, so nothing later can swap it for another build.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# 2. The project with its worker stack, test tools and FastVideo's import dependencies.
"${PIP[@]}" -e "$ROOT[worker,dev,bench,fastvideo]"
# 3. Ray, for DISTRIBUTED_EXECUTOR_BACKEND=ray and the ENGINE_FALLBACKS chain (tasks/engines/fastvideo_ray.py):
#    fastvideo 0.2.1 asks for ray>=2.49.1. A 79 MB wheel (about 240 MB installed), with msgpack and protobuf.
"${PIP[@]}" ray==2.60.0
# 4. FastVideo without its own dependency pins (see constraints-fastvideo.txt).
"${PIP[@]}" --no-deps fastvideo==0.2.1

# 5. fastvideo 0.2.1's wheel also installs a top-level `tests` package (its kernel tests). It shadows
#    this project's tests/ (`from tests.support import ...` fails), so it goes.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, shutil
dist = md.distribution("fastvideo")
if any(str(f).startswith("tests/") for f in dist.files or ()):
    stray = pathlib.Path(dist.locate_file("tests"))
    if stray.is_dir():
        shutil.rmtree(stray)
        print(f"removed fastvideo's stray top-level package {stray}")
PY

# Fail here, not in a worker, if the stack does not import.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import fastvideo, ray, torch, torchvision  # noqa: F401
from fastvideo import VideoGenerator  # noqa: F401
print(f"fastvideo {md.version('fastvideo')}, ray {ray.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}: OK")
PY
