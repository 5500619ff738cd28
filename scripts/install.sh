#!/usr/bin/env bash
# Install everything the demo and the tests need, on a fresh Debian/Ubuntu machine. Idempotent,
# non-interactive (no stdin). What it installs:
#   - Debian packages: redis-server (broker and result backend), ffmpeg (ffprobe, to inspect MP4s),
#     iproute2 and nftables (a worker on a bad network, in a namespace of its own: tests/netns.py),
#     chromium and chromium-driver (Flower in a real headless browser: tests/test_flower.py)
#   - .venv/ with torch pinned to the local CPU build (constraints.txt), then the project with its
#     worker, flower, api, demo, dev and bench extras, every later install held to the same torch by the constraints.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v ffprobe >/dev/null || missing+=(ffmpeg)
command -v nft >/dev/null || missing+=(nftables)  # tests/test_partition.py: packet loss in a namespace
command -v ip >/dev/null || missing+=(iproute2)
command -v chromium >/dev/null || missing+=(chromium)  # tests/test_flower.py drives Flower in it
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
        SUDO="sudo -n"
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off -c "$ROOT/constraints.txt")

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    say "installing torch (pinned in constraints.txt: the local CPU build)"
    "${PIP[@]}" torch
fi
say "installing the project with its worker, flower, demo, dev and bench extras"
"${PIP[@]}" -e "$ROOT[worker,flower,api,demo,dev,bench]"

"$VENV/bin/python" - <<'PY'
import celery, diffusers, torch
print(f"ready: torch {torch.__version__}, diffusers {diffusers.__version__}, celery {celery.__version__}")
PY
