"""Producers import ``tasks`` without the model stack."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_importing_tasks_does_not_import_torch_or_the_engines():
    code = (
        "import sys, tasks\n"
        "worker_only = ('torch', 'diffusers', 'transformers', 'numpy', 'av', 'prometheus_client', 'psutil')\n"
        "heavy = sorted(m for m in worker_only if m in sys.modules)\n"
        "print(tasks.render.name, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tasks.render []"
