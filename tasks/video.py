"""MP4 encoding with PyAV: H.264, yuv420p, faststart, so it plays in every browser."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["encode_mp4", "to_uint8_frames", "sha256_file"]


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) floats in [0, 1] (what diffusers returns) to contiguous uint8 RGB."""
    import numpy as np

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def encode_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18) -> Path:
    """Write uint8 RGB frames (T, H, W, 3) to ``path`` as H.264/yuv420p; atomic via a temp name."""
    import av

    count, height, width, _ = frames.shape
    tmp = Path(f"{path}.{os.getpid()}.part")
    with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "fast"}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
