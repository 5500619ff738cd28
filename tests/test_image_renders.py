"""Image-conditioned renders through the real queue (issue 17, part 2), on ``tiny-wan-ti2v`` with diffusers.

A real worker serves ``tiny-wan-ti2v`` (Wan2.2-TI2V's shapes in miniature). A request sends its
image inline (a data URL) or as an object in the farm's bucket (``renderfarm upload-image``): the
image is stored once at ``inputs/<sha256>.<ext>``, its hash is in the video's key, the same image
by either route is the same video, another image is another video, and the image reaches the
model (the frames differ). Bad images fail fast with a message naming ``image``; the worker keeps
serving. FastVideo renders the same requests in ``tests/test_fastvideo_image.py``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from PIL import Image

from tasks.images import data_url
from tests.support import ROOT, download_verified, object_bytes, videos_in

SIZE = {"height": 64, "width": 96, "num_frames": 9, "num_inference_steps": 2, "seed": 5}


def picture(seed: int, fmt: str = "PNG", size: tuple[int, int] = (120, 80)) -> bytes:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def frames_of(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)


def render(producer: Celery, **kwargs) -> dict:
    return producer.send_task("tasks.render", kwargs={"prompt": "a fox", **SIZE, **kwargs}, queue="render").get(
        timeout=180
    )


def test_an_image_conditioned_render_is_stored_keyed_and_served_again(
    start_worker, worker_env, producer: Celery, s3, bucket, tmp_path: Path
):
    start_worker(MODEL_ID="tiny-wan-ti2v")
    red, other = picture(1), picture(2, "JPEG")
    inline = render(producer, image=data_url(red))
    digest = hashlib.sha256(red).hexdigest()
    assert (inline["image_sha256"], inline["image_key"]) == (digest, f"inputs/{digest}.png")
    assert object_bytes(s3, bucket, inline["image_key"]) == red  # stored as sent
    probe = download_verified(inline, tmp_path / "inline.mp4")
    assert (probe["width"], probe["height"], int(probe["nb_read_frames"])) == (96, 64, 9)
    assert inline["poster_key"] and not inline["cached"]

    # The same file uploaded to the bucket is the same image: the same video, from storage.
    (tmp_path / "red.png").write_bytes(red)
    env = {**worker_env, "MODEL_ID": "tiny-wan-ti2v"}
    upload = subprocess.run([sys.executable, "-m", "renderfarm.cli", "upload-image", str(tmp_path / "red.png")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert upload.stdout.strip() == f"s3://{bucket}/inputs/{digest}.png"
    by_reference = render(producer, image=upload.stdout.strip())
    assert by_reference["cached"] and by_reference["key"] == inline["key"]

    # Another image, and no image: other videos, and the image reached the model.
    with_other = render(producer, image=data_url(other))
    text_only = render(producer)
    assert len({inline["key"], with_other["key"], text_only["key"]}) == 3
    assert with_other["image_key"].endswith(".jpg") and text_only["image_key"] is None
    first = frames_of(tmp_path / "inline.mp4")
    download_verified(with_other, tmp_path / "other.mp4")
    assert np.abs(first - frames_of(tmp_path / "other.mp4")).mean() > 1.0
    assert sorted(o.object_name for o in s3.list_objects(bucket, prefix="inputs/")) == sorted(
        [inline["image_key"], with_other["image_key"]]
    )
    assert len(videos_in(s3, bucket)) == 3


def test_bad_images_fail_fast_naming_the_field_and_the_worker_keeps_serving(start_worker, producer: Celery, s3, bucket):
    worker = start_worker(MODEL_ID="tiny-wan-ti2v", MAX_IMAGE_BYTES="20000", MAX_IMAGE_PIXELS="40000")
    child = worker.pool_children()[0].pid
    gif = io.BytesIO()
    Image.new("P", (32, 32)).save(gif, "GIF")
    big = picture(3, size=(400, 300))  # over 20,000 bytes
    wide = io.BytesIO()
    Image.new("RGB", (300, 200)).save(wide, "PNG")  # small file, 60,000 pixels
    s3.make_bucket(bucket)
    s3.put_object(bucket, "uploads/big.png", io.BytesIO(big), len(big))  # put there by other means
    cases = [
        (data_url(big), f"image: {len(big):,} bytes; at most 20,000 are allowed (MAX_IMAGE_BYTES)"),
        ("data:image/png;base64," + base64.b64encode(gif.getvalue()).decode(),
         "image: the bytes are not a PNG, JPEG or WebP image (the format is read from the content, not from a "
         "name or media type)"),
        (data_url(wide.getvalue()), "image: 300x200 = 60,000 pixels; at most 40,000 are allowed (MAX_IMAGE_PIXELS)"),
        ("s3://another-bucket/cat.png",
         "image: s3://another-bucket/cat.png is not in this farm's bucket; only s3://" + bucket + "/... may be named "
         "(upload the file with `renderfarm upload-image`, or send it as a data URL)"),
        (f"s3://{bucket}/inputs/missing.png", f"image: there is no object s3://{bucket}/inputs/missing.png"),
        (f"s3://{bucket}/uploads/big.png",
         f"image: s3://{bucket}/uploads/big.png: {len(big):,} bytes; at most 20,000 are allowed (MAX_IMAGE_BYTES)"),
    ]  # fmt: skip
    for image, expected in cases:
        result = producer.send_task("tasks.render", kwargs={"prompt": "p", **SIZE, "image": image}, queue="render")
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "InvalidRequest"
        assert str(info.value) == f"invalid render request: {expected}"
    assert "render tiny-wan-ti2v:" not in worker.log  # no model time for any of them
    assert list(s3.list_objects(bucket, prefix="inputs/")) == []  # nothing refused was stored
    good = render(producer, image=data_url(picture(4, size=(64, 48))))
    assert good["worker_pid"] == child and good["image_key"]
