"""The worker image's install resolves to one CUDA line (issue 15, part 1).

pip resolves exactly what ``Dockerfile.worker`` installs, for the image's Python (3.12, manylinux
x86_64), as a dry run with a report: metadata only, no wheel of torch or of a CUDA library is
downloaded. The three of FastVideo's dependencies that PyPI has only as source (``SDIST_ONLY``) are
built into wheels first, since a dry run for another Python takes wheels only. Then every package
whose metadata names a CUDA line must name the same one, the base image's:

- a ``-cu12``/``-cu13`` (or ``cuda12x``) suffix names it;
- ``cuda-toolkit``, ``cuda-bindings``, ``cuda-python``: their major version;
- torch: its ``+cuXYZ`` label, or none (PyPI's default build: its CUDA libraries are the packages above);
- the unsuffixed CUDA component wheels (``nvidia-cublas``, ``nvidia-cufft``...; NVIDIA's naming from
  CUDA 13 on): the line of the resolved ``cuda-toolkit`` that lists them.

``KNOWN_EXTRAS`` names what NVIDIA's own packaging adds beside the line, with the reason; anything
else on another line fails the test. Needs the package index (as CI's install does).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST_ONLY = ("test-tube==0.7.5", "gpustat==1.1.1", "watch==0.2.7")  # fastvideo 0.2.1's dependencies
KNOWN_EXTRAS = {
    # nvidia-cutlass-dsl 4.8.1 requires its CUDA 12 libraries unconditionally; the [cu13] extra that
    # flashinfer and nvidia-cudnn-frontend ask for adds the CUDA 13 ones beside them.
    "nvidia-cutlass-dsl-libs-cu12": "nvidia-cutlass-dsl",
}


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile.worker").read_text(), re.M)
    assert m, f"Dockerfile.worker has no ARG {name}"
    return m[1]


def image_requirements() -> list[str]:
    """What the Dockerfile's two pip installs ask for (its torch layer, then its dependencies layer)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        *project["dependencies"], *extras["worker"], *extras["flower"], *extras["api"],
        f"torch=={dockerfile_arg('TORCH_VERSION')}", f"torchvision=={dockerfile_arg('TORCHVISION_VERSION')}",
        f"fastvideo=={dockerfile_arg('FASTVIDEO_VERSION')}", f"ray=={dockerfile_arg('RAY_VERSION')}",
    ]  # fmt: skip


def cuda_line(name: str, version: str, toolkit_parts: dict[str, int]) -> int | None:
    """The CUDA major version a package's metadata names, or None when it names none."""
    if m := re.search(r"-cu(\d\d)$|-cuda(\d\d)x$", name):
        return int(m[1] or m[2])
    if name in ("cuda-toolkit", "cuda-bindings", "cuda-python"):
        return int(version.split(".")[0])
    if name == "torch":
        m = re.search(r"\+cu(\d\d)\d$", version)
        return int(m[1]) if m else None
    return toolkit_parts.get(name)


def test_the_images_install_resolves_to_one_cuda_line_the_base_images(tmp_path):
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu24\.04$", (ROOT / "Dockerfile.worker").read_text(),
                     re.M)  # fmt: skip
    assert base, "the base is the smallest CUDA image (base): the wheels bring the CUDA libraries"
    line = int(base[1])

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    *SDIST_ONLY], check=True, capture_output=True, timeout=300)  # fmt: skip
    (tmp_path / "requirements.txt").write_text("\n".join(image_requirements()) + "\n")
    platforms = [arg for n in range(17, 40) for arg in ("--platform", f"manylinux_2_{n}_x86_64")]
    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(tmp_path / "report.json"), "--target", str(tmp_path / "target"),
         "--only-binary=:all:", "--find-links", str(wheels), "--python-version", "3.12", "--implementation", "cp",
         "--abi", "cp312", *platforms, "--platform", "manylinux2014_x86_64", "--platform", "any",
         "-r", str(tmp_path / "requirements.txt")],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    errors = [line for line in resolved.stderr.splitlines() if "WARNING: Location" not in line]
    assert resolved.returncode == 0, "the image's install does not resolve:\n" + "\n".join(errors[-20:])

    installed = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]
        for item in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    assert installed["torch"]["version"] == dockerfile_arg("TORCH_VERSION")
    assert "fastvideo" in installed and "ray" in installed
    toolkit = installed["cuda-toolkit"]
    toolkit_parts = {
        m[1].lower(): int(toolkit["version"].split(".")[0])
        for req in toolkit.get("requires_dist") or []
        if (m := re.match(r"([A-Za-z0-9_.-]+)==", req))
    }
    lines = {
        name: found
        for name, meta in installed.items()
        if (found := cuda_line(name, meta["version"], toolkit_parts)) is not None
    }
    # The CUDA libraries torch itself needs are on the line, and stated by the rules above.
    torch_needs = [
        re.match(r"[A-Za-z0-9_.-]+", req)[0].lower()  # type: ignore[index]
        for req in installed["torch"].get("requires_dist") or []
        if req.startswith(("nvidia-", "cuda-")) and "extra ==" not in req
    ]
    assert torch_needs and all(lines.get(name) == line for name in torch_needs), {n: lines.get(n) for n in torch_needs}
    off_line = {name: found for name, found in lines.items() if found != line and name not in KNOWN_EXTRAS}
    assert not off_line, f"CUDA-bearing packages off the image's CUDA {line} line: {off_line}"
    for extra, why in KNOWN_EXTRAS.items():  # an exception that no longer applies is dropped from the list
        assert extra in installed and why in installed, f"{extra} no longer comes with {why}: drop it from KNOWN_EXTRAS"
