"""Image-conditioned FastVideo renders at the size the request asked for.

FastVideo 0.2.1's input stage (``pipelines/stages/input_validation.py``) gives a text-and-image-to-
video render (Wan2.2-TI2V, ``ti2v_task``) the size ``best_output_size`` picks for the image: the
image's aspect ratio at about 480x832 pixels, whatever height and width the request named (a 64x64
request rendered 640x608 here). This farm has already made the image into the first frame at the
requested size (``tasks.engines.conditioning``), a multiple of the model's patch size, so that
size is the answer: ``install_in_worker`` makes ``best_output_size`` keep an image whose sides are
already multiples of the patch size, in FastVideo's worker processes (the mp executor's spawned
worker and Ray's actors), and leaves every other case to FastVideo. The MP4's size is checked
against the request's before it is stored all the same (``tasks.pipeline.s5_encode``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["install_in_worker", "keeps_a_fitting_size"]


def keeps_a_fitting_size(original: Any) -> Any:
    """``best_output_size`` that returns ``(w, h)`` when both are multiples of ``(dw, dh)`` and fit the area."""

    def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: float) -> tuple[int, int]:
        if w % dw == 0 and h % dh == 0:
            return w, h
        return tuple(original(w, h, dw, dh, expected_area))  # type: ignore[return-value]

    best_output_size._renderfarm = True  # type: ignore[attr-defined]
    return best_output_size


def install_in_worker() -> None:
    """In FastVideo's worker process (idempotent)."""
    from fastvideo.pipelines.stages import input_validation

    current = input_validation.best_output_size
    if not getattr(current, "_renderfarm", False):
        input_validation.best_output_size = keeps_a_fitting_size(current)
