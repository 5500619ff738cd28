"""MP4 encoding: H.264, yuv420p, the right frame count, size and rate."""

from __future__ import annotations

import av
import numpy as np
import pytest

from tasks.pipeline.s5_encode import encode_mp4, sha256_file, to_uint8_frames, write_previews


def test_encoded_video_decodes_to_the_same_frames(tmp_path):
    rng = np.random.default_rng(0)
    frames = to_uint8_frames(rng.random((17, 32, 64, 3), dtype=np.float32))
    path = encode_mp4(frames, fps=24, path=tmp_path / "out.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 24
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 17 and decoded[0].shape == (32, 64, 3)
    assert not list(tmp_path.glob("*.part"))
    assert len(sha256_file(path)) == 64


def test_float_frames_are_clipped_and_scaled():
    frames = np.array([[[[-0.5, 0.5, 1.5]]]], dtype=np.float32)
    assert to_uint8_frames(frames).tolist() == [[[[0, 128, 255]]]]


def test_frames_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"expected frames shaped \(T, H, W, 3\)"):
        to_uint8_frames(np.zeros((4, 8, 8), dtype=np.float32))


@pytest.mark.parametrize(("count", "shown"), [(17, [0, 2, 4, 6, 8, 10, 12, 14, 16]), (5, [0, 1, 2, 3, 4]), (1, [0])])
def test_the_poster_is_the_middle_frame_and_the_spritesheet_spreads_frames_in_rows_of_three(tmp_path, count, shown):
    from PIL import Image

    levels = [int(v) for v in np.linspace(10, 245, count)]  # frame i is a flat grey of its own level
    frames = np.stack([np.full((32, 48, 3), level, np.uint8) for level in levels])
    write_previews(encode_mp4(frames, 8, tmp_path / "v.mp4"), tmp_path / "p.jpg", tmp_path / "s.jpg")
    poster, sheet = Image.open(tmp_path / "p.jpg"), Image.open(tmp_path / "s.jpg")
    assert poster.size == (48, 32) and abs(poster.getpixel((24, 16))[0] - levels[count // 2]) <= 6  # the middle frame
    columns = min(3, len(shown))
    assert sheet.size == (48 * columns, 32 * -(-len(shown) // columns))
    seen = [sheet.getpixel((48 * (n % 3) + 24, 32 * (n // 3) + 16))[0] for n in range(len(shown))]
    assert all(abs(got - levels[frame]) <= 6 for got, frame in zip(seen, shown, strict=True)), (seen, shown)
