"""Model profiles: the defaults a request falls back to, per served model.

A request that leaves a field out gets the profile's value, so ``render.delay(prompt=...)`` does
what the model was trained for: 480x832x81 at 16 fps for Wan2.1, something that finishes in a
second on a CPU for ``tiny-wan``. Unknown model ids (any diffusers-format Wan2.1 text-to-video
checkpoint) use the Wan2.1 profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Profile", "profile_for"]


@dataclass(frozen=True)
class Profile:
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    negative_prompt: str

    def defaults(self) -> dict[str, object]:
        return asdict(self)


_WAN21 = Profile(
    height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16, negative_prompt=""
)
_FASTWAN = Profile(
    height=480, width=832, num_frames=81, num_inference_steps=3, guidance_scale=1.0, fps=16, negative_prompt=""
)
_TINY = Profile(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0, fps=8, negative_prompt="")

_PROFILES = {
    "tiny-wan": _TINY,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": _WAN21,
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": _WAN21,
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": _FASTWAN,
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": Profile(
        height=704, width=1280, num_frames=121, num_inference_steps=3, guidance_scale=1.0, fps=24, negative_prompt=""
    ),
}


def profile_for(model_id: str) -> Profile:
    return _PROFILES.get(model_id, _WAN21)
