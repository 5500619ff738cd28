"""Conditioning images (issue 17, part 2): every check of ``tasks.images`` and the first frame, no worker.

Each rejection is asserted by its message, which names the field and what is allowed; images that
pass are checked for what the render keys on (format, size, hash).
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from tasks.engines.conditioning import first_frame
from tasks.errors import InvalidRequest
from tasks.images import check_image, data_url, decode_data_url, parse_ref
from tasks.keys import check_model, object_key, resolve
from tasks.schemas import Limits, parse_request

MAX_BYTES, MAX_PIXELS = 1_000_000, 6000 * 6000
LIMITS = Limits(max_prompt_chars=2000, max_pixel_frames=10**9, models=("tiny-wan-ti2v", "tiny-wan"))


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, fmt)  # type: ignore[arg-type]
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all zeros: tiny on disk, huge in pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("fmt", "media"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_png_jpeg_and_webp_pass_with_their_hash_and_content_address(fmt, media):
    data = encoded(fmt)
    image = check_image(data, MAX_BYTES, MAX_PIXELS, declared=media)
    assert (image.format, image.width, image.height, image.media_type) == (fmt, 40, 30, media)
    digest = hashlib.sha256(data).hexdigest()
    assert image.sha256 == digest
    assert image.key == f"inputs/{digest}.{ {'PNG': 'png', 'JPEG': 'jpg', 'WEBP': 'webp'}[fmt] }"
    assert data_url(data) == f"data:{media};base64,{base64.b64encode(data).decode()}"


def test_the_format_is_read_from_the_bytes_not_the_name():
    with pytest.raises(ValueError, match="the data URL says image/png but the bytes are a JPEG image"):
        check_image(encoded("JPEG"), MAX_BYTES, MAX_PIXELS, declared="image/png")
    with pytest.raises(ValueError, match=r"not a PNG, JPEG or WebP image .*read from the content"):
        check_image(encoded("GIF", mode="P", color=1), MAX_BYTES, MAX_PIXELS)
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP image"):
        check_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", MAX_BYTES, MAX_PIXELS)


def test_size_in_bytes_is_limited_before_anything_is_decoded():
    data = encoded("PNG", (300, 300), color=None)  # noise-free but over the tiny limit below
    with pytest.raises(ValueError, match=rf"image: {len(data):,} bytes; at most 100 are allowed \(MAX_IMAGE_BYTES\)"):
        check_image(data, 100, MAX_PIXELS)
    big = "data:image/png;base64," + "A" * 4_000_000  # 3 MB of base64: refused by its length alone
    with pytest.raises(ValueError, match=r"image: 3,000,000 bytes; at most 1,000,000 are allowed"):
        decode_data_url(parse_ref(big), MAX_BYTES)
    with pytest.raises(ValueError, match="not valid base64"):
        decode_data_url(parse_ref("data:image/png;base64,%%%"), MAX_BYTES)


def test_decompression_bombs_are_refused_from_the_header():
    bomb = png_header_only(7000, 7000)  # 49 Mpx in a few KB: over MAX_IMAGE_PIXELS, under Pillow's own limit
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match=r"7000x7000 = 49,000,000 pixels; at most 36,000,000 .*MAX_IMAGE_PIXELS"):
        check_image(bomb, MAX_BYTES, MAX_PIXELS)
    huge = png_header_only(20000, 20000)  # 400 Mpx: Pillow refuses it itself, told in our words
    with pytest.raises(ValueError, match=r"too many pixels .*MAX_IMAGE_PIXELS"):
        check_image(huge, MAX_BYTES, MAX_PIXELS)


def test_damaged_animated_and_tiny_images_are_refused():
    data = encoded("PNG", (200, 200), color=None)
    noisy = io.BytesIO()
    Image.effect_noise((200, 200), 64).convert("RGB").save(noisy, "PNG")
    with pytest.raises(ValueError, match="the PNG data is damaged or truncated"):
        check_image(noisy.getvalue()[: len(noisy.getvalue()) // 2], MAX_BYTES, MAX_PIXELS)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    animated = io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"an animated WEBP \(2 frames\); send a single image"):
        check_image(animated.getvalue(), MAX_BYTES, MAX_PIXELS)
    with pytest.raises(ValueError, match="8x8; each side must be at least 16 pixels"):
        check_image(encoded("PNG", (8, 8)), MAX_BYTES, MAX_PIXELS)
    assert check_image(data, MAX_BYTES, MAX_PIXELS).width == 200


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://example.invalid/cat.png", "https:// URLs are not fetched; use a data:image/png|jpeg|webp"),
        ("file:///etc/passwd", "file:// URLs are not fetched"),
        ("data:image/gif;base64,R0lGOD", "data URL of type image/gif; allowed: image/jpeg, image/png, image/webp"),
        ("data:image/png,rawbytes", "not a base64 image data URL"),
        ("cat.png", "not an image reference; use a data:image/png|jpeg|webp;base64,... URL or s3://"),
    ],
)
def test_only_data_urls_and_the_farms_bucket_are_image_references(value, message):
    with pytest.raises(InvalidRequest, match=rf"image: .*{message.replace('|', '[|]').replace('.', '[.]')}"):
        parse_request({"prompt": "p", "image": value})


def test_an_image_goes_only_to_a_model_that_takes_one():
    request = parse_request({"prompt": "p", "model": "tiny-wan", "image": data_url(encoded("PNG"))})
    with pytest.raises(InvalidRequest, match=r"image: tiny-wan is a text-to-video model and takes no image; "
                                             r"models that do: tiny-wan-ti2v, .*FastWan2.2-TI2V-5B"):  # fmt: skip
        check_model(request, "tiny-wan", LIMITS)


def test_the_images_hash_is_part_of_the_key_and_text_only_keys_are_unchanged():
    red, blue = encoded("PNG", color=(255, 0, 0)), encoded("PNG", color=(0, 0, 255))

    def key(image: bytes | None) -> str:
        fields = {"prompt": "a fox", "model": "tiny-wan-ti2v", "seed": 3}
        if image is not None:
            fields["image"] = data_url(image)
        checked = None if image is None else check_image(image, MAX_BYTES, MAX_PIXELS)
        spec = resolve(parse_request(fields), "tiny-wan-ti2v", "t1", LIMITS, checked)
        assert ("image_sha256" in spec) == (image is not None)
        return object_key(spec)

    assert key(red) == key(red) != key(blue)
    assert key(None) not in (key(red), key(blue))
    spec = resolve(parse_request({"prompt": "a fox", "seed": 3}), "tiny-wan", "t1", LIMITS)
    assert "image_sha256" not in spec  # a text-to-video render's key is what it was before images existed
    with pytest.raises(InvalidRequest, match=r"height: 48 is not a multiple of 32, which tiny-wan-ti2v needs"):
        resolve(parse_request({"prompt": "p", "height": 48}), "tiny-wan-ti2v", "t1", LIMITS)


def test_the_first_frame_is_upright_unstretched_opaque_and_exactly_the_videos_size():
    wide = Image.new("RGB", (200, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (50, 0, 150, 100))  # red centre, blue edges
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    out = io.BytesIO()
    wide.save(out, "JPEG", exif=exif, quality=95)
    frame = first_frame(check_image(out.getvalue(), MAX_BYTES, MAX_PIXELS), 64, 96)
    assert frame.size == (64, 96) and frame.mode == "RGB"
    # Upright the image is 100 wide and 200 tall, red in its middle rows: cropped about the centre
    # to 2:3 (rows 25-175) and scaled, blue at the top and bottom, red in the middle. Not turned
    # upright, the crop would be the red middle columns only.
    top, middle = frame.getpixel((32, 3)), frame.getpixel((32, 48))
    assert top[2] > 200 and top[0] < 60, top  # type: ignore[index]
    assert middle[0] > 200 and middle[2] < 60, middle  # type: ignore[index]
    clear = io.BytesIO()
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(clear, "PNG")
    assert first_frame(check_image(clear.getvalue(), MAX_BYTES, MAX_PIXELS), 32, 32).getpixel((5, 5)) == (255, 255, 255)
