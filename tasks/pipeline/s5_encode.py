"""Stage 5, ``encoding``: the frames become an MP4 in the spool, with the metadata it is stored under,
a poster (the video's middle frame as a JPEG, for web pages) and a spritesheet (nine frames spread
over the video in a 3x3 grid, a JPEG: what a scrubber or a preview shows).

Frames are encoded with PyAV (``tasks.engines.mp4``): H.264, yuv420p, faststart, so it plays in
every browser. An engine that wrote the MP4 itself (FastVideo, through the same encoder) hands over
its path, and the file is moved into place once its width and height are checked against the
request's (the size is part of the stored metadata). The poster is decoded from the MP4 either way
(what a viewer sees, whichever engine wrote it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.engines import RenderOutput
from tasks.engines.mp4 import encode_mp4
from tasks.errors import RenderError
from tasks.keys import RenderSpec

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from tasks.pipeline.s4_generate import Memory

__all__ = ["encode", "video_metadata", "encode_mp4", "to_uint8_frames", "sha256_file", "write_previews"]

POSTER_QUALITY = 85
SHEET_COLUMNS, SHEET_FRAMES, SHEET_TILE_WIDTH = 3, 9, 256


def encode(output: RenderOutput, engine: str, spec: RenderSpec, path: Path) -> None:
    """Write the render's MP4 to ``path``; the output's frames are dropped as soon as they are converted."""
    if output.video_path is not None:
        size = _video_size(output.video_path)
        if size != (spec["width"], spec["height"]):  # stored under the spec's size: it must be that size
            raise RenderError(
                f"engine {engine} wrote a {size[0]}x{size[1]} video; {spec['width']}x{spec['height']} was asked for"
            )
        os.replace(output.video_path, path)
        return
    if output.frames is None:
        raise RenderError(f"engine {engine} returned neither frames nor a video file")
    frames, output.frames = to_uint8_frames(output.frames), None
    expected = (spec["num_frames"], spec["height"], spec["width"], 3)
    if frames.shape != expected:
        raise RenderError(f"engine {engine} returned frames shaped {frames.shape}, expected {expected}")
    encode_mp4(frames, spec["fps"], path)


def video_metadata(
    path: Path, spec: RenderSpec, engine: str, memory: Memory, image_key: str | None = None
) -> dict[str, str]:
    """What the video is stored with (S3 user metadata): its hash, size, seed, model and engine, and
    an image-conditioned render's image (its hash and key)."""
    metadata = {
        "sha256": sha256_file(path),
        "width": str(spec["width"]),
        "height": str(spec["height"]),
        "num-frames": str(spec["num_frames"]),
        "fps": str(spec["fps"]),
        "seed": str(spec["seed"]),
        "model": spec["model"],
        "engine": engine,
    }
    if image_key is not None:
        metadata.update({"image-sha256": spec["image_sha256"], "image-key": image_key})
    peak_mb, memory_source = memory
    if peak_mb is not None and memory_source is not None:
        metadata.update({"peak-memory-mb": str(peak_mb), "memory-source": memory_source})
    return metadata


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) floats in [0, 1] (what diffusers returns) to contiguous uint8 RGB."""
    import numpy as np

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _video_size(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


def write_previews(video: Path, poster: Path, sheet: Path) -> None:
    """The MP4's poster (its middle frame) and spritesheet (up to ``SHEET_FRAMES`` frames spread
    evenly, first to last, in rows of ``SHEET_COLUMNS``, each at most ``SHEET_TILE_WIDTH`` wide),
    both JPEGs, from one pass over the frames (atomic via temp names)."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        count = stream.frames or sum(1 for _ in container.decode(stream))
        if not stream.frames:
            container.seek(0)
        n = min(SHEET_FRAMES, count)
        wanted = {round(i * (count - 1) / (n - 1)) for i in range(n)} if n > 1 else {0}
        middle = count // 2
        tiles: list[Image.Image] = []
        cover = None
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted or index == middle:
                image = frame.to_image()
                if index in wanted:
                    tiles.append(image)
                if index == middle:
                    cover = image
            if index >= max(wanted | {middle}):
                break
    if cover is None or not tiles:
        raise RenderError(f"{video.name} has no frame to make a poster from")
    _save_jpeg(cover, poster)
    _save_jpeg(_grid(tiles), sheet)


def _grid(tiles: list[Image.Image]) -> Image.Image:
    from PIL import Image

    width, height = tiles[0].size
    scale = min(1.0, SHEET_TILE_WIDTH / width)
    tile = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = min(SHEET_COLUMNS, len(tiles))
    grid = Image.new("RGB", (tile[0] * columns, tile[1] * -(-len(tiles) // columns)))
    for n, image in enumerate(tiles):
        grid.paste(image.resize(tile), ((n % columns) * tile[0], (n // columns) * tile[1]))
    return grid


def _save_jpeg(image: Image.Image, path: Path) -> None:
    tmp = Path(f"{path}.{os.getpid()}.part")
    image.save(tmp, format="JPEG", quality=POSTER_QUALITY)
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
