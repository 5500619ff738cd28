"""Image-conditioned renders with FastVideo (issue 17, part 2): tiny-wan-ti2v in a real prefork worker.

FastVideo loads ``tiny-wan-ti2v`` with its Wan2.2-TI2V-5B pipeline configuration (``ti2v_task``: the
image's latent replaces the first frame's) and renders at the size the request named, not the
~480x832-pixel size FastVideo 0.2.1 would pick from the image (``tasks.engines.fastvideo_image``).
Run in .venv-fastvideo; skipped where fastvideo is not importable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from celery import Celery

from tasks.images import data_url
from tests.support import download_verified, object_bytes
from tests.test_image_renders import frames_of, picture, render

try:
    import fastvideo  # noqa: F401
except ImportError:
    pytest.skip("fastvideo is not installed in this venv: see tests/test_fastvideo.py", allow_module_level=True)

pytestmark = pytest.mark.timeout(600)


def test_fastvideo_renders_from_an_image_at_the_requested_size(start_worker, producer: Celery, s3, bucket, tmp_path):
    worker = start_worker(MODEL_ID="tiny-wan-ti2v", ENGINE="fastvideo")
    assert "Wan2_2_TI2V_5B_Config" in worker.log  # FastVideo configured it as Wan2.2-TI2V, not Wan2.1 T2V
    first = render(producer, image=data_url(picture(1)))
    assert (first["engine"], first["model"], first["width"], first["height"]) == ("fastvideo", "tiny-wan-ti2v", 96, 64)
    probe = download_verified(first, tmp_path / "first.mp4")
    assert (probe["width"], probe["height"], int(probe["nb_read_frames"])) == (96, 64, 9)
    assert object_bytes(s3, bucket, first["image_key"]) == picture(1)

    again = render(producer, image=data_url(picture(1)))
    other = render(producer, image=data_url(picture(2)))
    text_only = render(producer)
    assert again["cached"] and again["key"] == first["key"]
    assert len({first["key"], other["key"], text_only["key"]}) == 3
    download_verified(other, tmp_path / "other.mp4")
    assert np.abs(frames_of(tmp_path / "first.mp4") - frames_of(tmp_path / "other.mp4")).mean() > 1.0
    assert other["worker_pid"] == first["worker_pid"]  # one pool process, the model loaded once
    assert worker.log.count("VideoGenerator.from_pretrained(") == 1
    assert not list(Path(tmp_path).glob("spool/.fastvideo-*/*.png"))  # the first frames handed over are gone
