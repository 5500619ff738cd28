#!/bin/sh
# Entrypoint of the worker image (Dockerfile.worker) and of every compose worker.
#
# 1. The self-check (python -m tasks.worker.selfcheck) prints its banner: PyTorch, CUDA, GPU,
#    FastVideo, /dev/shm, a real spawn pool, and the engine this container will load. When nothing
#    can run here (e.g. no usable /dev/shm and no fallback left) it exits non-zero and so does this
#    script, with the fix in its last lines, instead of starting a worker that cannot render.
# 2. Replaces itself with the Celery worker: prefork, one pool child (it owns the loaded model),
#    queue `render`, task events on (-E, for Flower), node name render@<hostname>. The health
#    check (python -m tasks.worker.healthcheck) asks exactly that node whether its model is loaded.
#
# `exec` matters: celery's main process takes this shell's pid, so the container's stop signal
# (SIGTERM, passed on by tini) reaches it, and its warm shutdown gives a running render back to the
# queue at its next denoising step with a checkpoint (docs/deploy.md#stopping-a-worker).
#
# Arguments are appended to the celery command line, e.g. `--loglevel DEBUG`. Settings come from
# the environment only (worker_config/settings.py); invalid ones stop the worker at start with a
# message that names the variable.
set -eu

python -m tasks.worker.selfcheck

exec celery -A tasks worker --pool=prefork --concurrency=1 -Q render -E -n "render@%h" --loglevel INFO "$@"
