"""Frames to an MP4: the one encoder of every video this farm stores (PyAV: H.264, yuv420p, faststart).

The pipeline encodes the diffusers engine's frames with it (``tasks.pipeline.s5_encode``), and
FastVideo's own MP4 writing is routed to it (``tasks.engines.fastvideo_mp4``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["encode_mp4"]


def encode_mp4(frames: np.ndarray | Sequence[np.ndarray], fps: int, path: Path, crf: int = 18) -> Path:
    """Write uint8 RGB frames (T, H, W, 3), as one array or a sequence of (H, W, 3) arrays, to ``path``
    as H.264/yuv420p; atomic via a temp name."""
    import av

    count = len(frames)
    height, width = frames[0].shape[:2]
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
