"""Model profiles: the defaults a request falls back to, and the size rules, per served model.

A request that leaves a field out gets the profile's value, so ``render.delay(prompt=...)`` does
what the model was trained for: 480x832x81 at 16 fps for Wan2.1, 704x1280x121 at 24 fps in 3
steps for FastWan2.2-TI2V-5B, something that finishes in a second on a CPU for ``tiny-wan``. An
omitted ``negative_prompt`` is the model's own default negative prompt (the one its authors ship
and FastVideo's presets use: English for the Wan2.1 family, Chinese for Wan2.2). ``size_multiple``
is what height and width must be multiples of: 16 for Wan2.1 (its VAE compresses 8x, its
transformer patches 2x), 32 for Wan2.2-TI2V-5B (a 16x VAE). ``takes_image``: the model renders
text-and-image-to-video (Wan2.2-TI2V-5B and its FastWan distillations, and the built-in
``tiny-wan-ti2v`` in their shapes): a request may send an ``image`` (``tasks.images``), which
becomes the video's first frame; to any other model an ``image`` is an error. Unknown model ids
(any diffusers-format Wan2.1 text-to-video checkpoint) use the Wan2.1 profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Profile", "profile_for", "image_models", "WAN_NEGATIVE_PROMPT_EN", "WAN_NEGATIVE_PROMPT_CN"]

WAN_NEGATIVE_PROMPT_EN = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
WAN_NEGATIVE_PROMPT_CN = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Profile:
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    negative_prompt: str
    size_multiple: int = 16  # height and width must be multiples of this (not a request field)
    takes_image: bool = False  # text-and-image-to-video: the request's ``image`` becomes the first frame

    def defaults(self) -> dict[str, object]:
        """The request fields this profile fills in."""
        fields = asdict(self)
        del fields["size_multiple"], fields["takes_image"]
        return fields


_WAN21 = Profile(
    height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16,
    negative_prompt=WAN_NEGATIVE_PROMPT_EN,
)  # fmt: skip
_FASTWAN21 = Profile(
    height=480, width=832, num_frames=81, num_inference_steps=3, guidance_scale=1.0, fps=16,
    negative_prompt=WAN_NEGATIVE_PROMPT_EN,
)  # fmt: skip
_WAN22_5B = Profile(
    height=704, width=1280, num_frames=121, num_inference_steps=50, guidance_scale=5.0, fps=24,
    negative_prompt=WAN_NEGATIVE_PROMPT_CN, size_multiple=32, takes_image=True,
)  # fmt: skip
_FASTWAN22_5B = Profile(
    height=704, width=1280, num_frames=121, num_inference_steps=3, guidance_scale=1.0, fps=24,
    negative_prompt=WAN_NEGATIVE_PROMPT_CN, size_multiple=32, takes_image=True,
)  # fmt: skip
_TINY = Profile(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8, negative_prompt="")
_TINY_TI2V = Profile(
    height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8, negative_prompt="",
    size_multiple=32, takes_image=True,
)  # fmt: skip

_PROFILES = {
    "tiny-wan": _TINY,
    "tiny-wan-ti2v": _TINY_TI2V,
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": _WAN22_5B,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": _WAN21,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": _WAN21,
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": _FASTWAN21,
    "FastVideo/FastWan2.2-TI2V-5B-Diffusers": _FASTWAN22_5B,
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": _FASTWAN22_5B,
}


def profile_for(model_id: str) -> Profile:
    return _PROFILES.get(model_id, _WAN21)


def image_models() -> tuple[str, ...]:
    """The known models that take an ``image`` (text-and-image-to-video)."""
    return tuple(model for model, profile in _PROFILES.items() if profile.takes_image)
