#!/usr/bin/env bash
# The GPU smoke check on a machine without network (issue 13): `make gpu-smoke`.
#
# Installs what the machine's Python lacks from the bundle that `make gpu-bundle` gathered
# elsewhere (.gpu-bundle/: wheels, and Debian's redis-server), with no index, into a folder of its
# own, then runs `python -m bench.gpu_smoke` from this source tree. Arguments go to the smoke:
#   scripts/gpu-smoke.sh                   # on a GPU: Wan2.1-1.3B shapes, every row
#   scripts/gpu-smoke.sh --device cpu      # the CPU twin (tiny shapes), as CI runs it
# Each row is killed after --row-timeout seconds and the run ends by --budget (defaults fit a lent
# GPU's 590 s command: docs/gpu.md); a row that hangs is reported "timed out" and the next one runs.
# Settings: PYTHON (default python3), BUNDLE (default .gpu-bundle), SITE (default /tmp/renderfarm-site).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUNDLE="${BUNDLE:-$ROOT/.gpu-bundle}"
SITE="${SITE:-/tmp/renderfarm-site}"
cd "$ROOT"

if [[ -d "$BUNDLE/wheels" ]]; then
    started=$SECONDS
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$BUNDLE"/wheels/*.whl | wc -l) wheels from $BUNDLE into $SITE in $((SECONDS - started))s"
fi
if ! command -v redis-server >/dev/null && [[ -d "$BUNDLE/debs" ]]; then
    for deb in "$BUNDLE"/debs/*.deb; do dpkg -x "$deb" "$SITE/redis-root"; done
    export PATH="$SITE/redis-root/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$SITE/redis-root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "redis-server from $BUNDLE/debs: $(redis-server --version)"
fi
exec "$PYTHON" -m bench.gpu_smoke "$@"
