"""What the farm takes from Celery's, kombu's and billiard's internals is still there.

Each module that reaches into them lists what it uses in ``INTERNALS``; pyproject.toml pins those
packages to the series this was proven with. A newer release that drops or renames one fails
here, naming the module and the internal, before a worker misbehaves in production.
"""

from __future__ import annotations

import importlib
import tomllib
from importlib.metadata import version
from typing import Any

import pytest
from packaging.requirements import Requirement

from tasks.worker.mp_in_pool import PROJECT_ROOT

MODULES = [
    "tasks.pipeline.progress",
    "tasks.worker.lease",
    "tasks.worker.mp_in_pool",
    "tasks.worker.lifecycle",
    "tasks.worker.logs",
    "tasks.worker.healthcheck",
    "tasks.worker.revoke",
    "renderfarm.flower",
    "tasks.cancel",
    "worker_config.redis_backend",
]
PINNED = ("celery", "kombu", "billiard")


def resolve(dotted: str) -> Any:
    """The object ``dotted`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("module", MODULES)
def test_every_internal_a_worker_module_relies_on_is_there(module: str):
    internals = importlib.import_module(module).INTERNALS
    assert internals, f"{module} lists no internals"
    versions = ", ".join(f"{name} {version(name)}" for name in PINNED)
    for dotted in internals:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as exc:
            pytest.fail(
                f"{module} relies on {dotted}, which is gone ({versions}): {exc}. Prove the module "
                "against this release and update it, or keep the pin in pyproject.toml below it."
            )


def test_the_check_fails_on_a_missing_internal():
    with pytest.raises(AttributeError):
        resolve("celery.worker.state.no_such_internal")
    assert resolve("celery.worker.state.active_requests") is not None


def test_celery_kombu_and_billiard_are_pinned_to_the_proven_series():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(line).name: Requirement(line) for line in project["dependencies"]}
    for name in PINNED:
        assert name in requirements, f"pyproject.toml does not pin {name}"
        specifier = requirements[name].specifier
        assert any(spec.operator == "<" for spec in specifier), f"{name} has no upper bound: {specifier}"
        assert specifier.contains(version(name)), f"installed {name} {version(name)} is outside {specifier}"
