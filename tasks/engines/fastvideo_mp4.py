"""FastVideo's MP4s written by this farm's encoder (``tasks.engines.mp4``), not by imageio.

FastVideo 0.2.1's ``VideoGenerator`` (in the pool process) writes a finished video with
``imageio.mimsave(path, frames, fps=..., format="mp4")``. imageio hands that to imageio-ffmpeg, an
ffmpeg executable run as a subprocess; without imageio-ffmpeg it falls back to its PyAV plugin,
which refuses a write that names no codec (FastVideo names none), so every render fails after
its full denoising. The GPU smoke check's machine has no imageio-ffmpeg (its 68 MB wheel does not
fit the bundle), and a lean image need not carry it.

``install()`` gives FastVideo's module a view of imageio whose ``mimsave`` of an ``.mp4`` encodes
the frames with PyAV in this process, as the diffusers engine's frames are: the same codec, quality
and faststart for every stored video, whichever engine rendered it. Every other call (images, other
formats) goes to imageio itself. ``tests/test_fastvideo_contract.py`` checks that FastVideo still
writes its videos this way.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

__all__ = ["install", "installed", "mimsave"]

_MODULE = "fastvideo.entrypoints.video_generator"


def mimsave(uri: Any, ims: Any, format: str | None = None, fps: float | None = None, **kwargs: Any) -> Any:
    """imageio's ``mimsave`` (its own argument names), with an MP4 written by ``encode_mp4``."""
    import imageio

    path = Path(str(uri))
    if path.suffix.lower() != ".mp4" or format not in (None, "mp4", ".mp4") or kwargs or fps is None:
        given = {"format": format, "fps": fps}
        return imageio.mimsave(uri, ims, **{k: v for k, v in given.items() if v is not None}, **kwargs)
    from tasks.engines.mp4 import encode_mp4

    encode_mp4(ims, round(fps), path)
    return None


def installed() -> bool:
    import importlib

    module = importlib.import_module(_MODULE)
    return getattr(module.imageio, "mimsave", None) is mimsave


def install() -> None:
    """Route ``imageio.mimsave`` in FastVideo's video generator to ``mimsave`` (idempotent)."""
    import importlib

    import imageio

    module = importlib.import_module(_MODULE)
    if installed():
        return
    view = types.ModuleType("imageio", "imageio, with MP4s written by tasks.engines.mp4 (tasks.engines.fastvideo_mp4)")
    view.__getattr__ = lambda name: getattr(imageio, name)  # type: ignore[method-assign]  # the rest is imageio's
    view.mimsave = mimsave  # type: ignore[attr-defined]
    module.imageio = view  # type: ignore[attr-defined]  # the module FastVideo imported
