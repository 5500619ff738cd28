"""A conditioning image made into the video's first frame: upright, cropped and sized, the same for every engine.

``first_frame`` turns a checked image (``tasks.images.ConditioningImage``) into an RGB picture of
exactly the render's width x height: turned upright by its EXIF orientation (phone photos), a
transparent image laid on white, then scaled to cover the frame and cropped about the centre
(``ImageOps.fit``, Lanczos), so nothing is stretched. Both engines condition on that picture:
diffusers' Wan2.2 pipeline gets it as it is, FastVideo as a PNG file in its output directory
(``tasks.engines.fastvideo_image`` keeps FastVideo from choosing another size for it).
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from tasks.images import ConditioningImage

__all__ = ["first_frame"]


def first_frame(image: ConditioningImage, width: int, height: int) -> Image.Image:
    from PIL import Image, ImageOps

    with Image.open(BytesIO(image.data), formats=[image.format]) as opened:
        upright = ImageOps.exif_transpose(opened)
        if upright.mode in ("RGBA", "LA") or (upright.mode == "P" and "transparency" in upright.info):
            rgba = upright.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = upright.convert("RGB")
    return ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
