"""Spec resolution and key derivation: defaults from the model profile, limits, stable keys."""

from __future__ import annotations

import re

import pytest

from tasks.errors import InvalidRequest
from tasks.keys import object_key, request_problems, resolve, seed_for_task
from tasks.profiles import WAN_NEGATIVE_PROMPT_CN, WAN_NEGATIVE_PROMPT_EN
from tasks.schemas import Limits, RenderRequest

LIMITS = Limits(max_prompt_chars=100, max_pixel_frames=832 * 480 * 81, models=("tiny-wan",))


def spec(task_id: str = "task-1", limits: Limits = LIMITS, **fields):
    return resolve(RenderRequest(prompt=fields.pop("prompt", "a cat"), **fields), "tiny-wan", task_id, limits)


def test_defaults_come_from_the_served_models_profile():
    assert spec(seed=3) == {
        "prompt": "a cat", "negative_prompt": "", "num_frames": 9, "height": 64, "width": 64,
        "num_inference_steps": 4, "guidance_scale": 5.0, "seed": 3, "fps": 8, "model": "tiny-wan",
    }  # fmt: skip


def test_same_request_same_key_and_any_change_changes_it():
    base = object_key(spec(seed=3))
    assert object_key(spec(seed=3)) == base
    assert object_key(spec(seed=3, task_id="another-task")) == base  # explicit seed: task id does not matter
    for change in ({"seed": 4}, {"prompt": "a dog"}, {"height": 80}, {"fps": 9}, {"guidance_scale": 4.0}):
        assert object_key(spec(**{"seed": 3, **change})) != base, change


def test_force_does_not_change_the_key():
    assert object_key(spec(seed=3, force=True)) == object_key(spec(seed=3))


def test_key_is_a_hash_never_user_text():
    key = object_key(spec(prompt="../../etc/passwd", seed=1))
    assert re.fullmatch(r"renders/[0-9a-f]{2}/[0-9a-f]{64}\.mp4", key)
    assert key.split("/")[1] == key.split("/")[2][:2]


def test_missing_seed_is_derived_from_the_task_id():
    assert spec(task_id="t-1")["seed"] == spec(task_id="t-1")["seed"] == seed_for_task("t-1")
    assert spec(task_id="t-1")["seed"] != spec(task_id="t-2")["seed"]
    assert 0 <= seed_for_task("anything") < 2**32


def test_unserved_model_is_rejected_naming_what_is_served():
    with pytest.raises(InvalidRequest, match=r"model: 'Wan-AI/Wan2.1-T2V-14B-Diffusers' is not served .* tiny-wan"):
        spec(model="Wan-AI/Wan2.1-T2V-14B-Diffusers")


def test_prompt_over_the_deployment_limit_is_rejected():
    with pytest.raises(InvalidRequest, match=r"prompt: 101 characters; at most 100"):
        spec(prompt="x" * 101)
    with pytest.raises(InvalidRequest, match=r"negative_prompt: 101 characters"):
        spec(negative_prompt="x" * 101)


def test_pixel_frame_budget_names_the_limit():
    with pytest.raises(InvalidRequest, match=r"1920x1920 x 257 frames = .* at most 32,348,160 \(MAX_PIXEL_FRAMES\)"):
        spec(height=1920, width=1920, num_frames=257)
    assert spec(height=480, width=832, num_frames=81)["num_frames"] == 81


FASTWAN22 = "FastVideo/FastWan2.2-TI2V-5B-Diffusers"
FASTWAN22_LIMITS = Limits(max_prompt_chars=100, max_pixel_frames=1280 * 720 * 129, models=(FASTWAN22,))


def fastwan22(**fields):
    return resolve(RenderRequest(prompt="a cat", seed=1, **fields), FASTWAN22, "t", FASTWAN22_LIMITS)


@pytest.mark.parametrize("model", [FASTWAN22, "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers"])
def test_fastwan22_renders_at_its_own_size_speed_and_default_negative_prompt(model):
    limits = Limits(max_prompt_chars=100, max_pixel_frames=1280 * 720 * 129, models=(model,))
    resolved = resolve(RenderRequest(prompt="a cat", seed=1), model, "t", limits)
    assert (resolved["height"], resolved["width"], resolved["num_frames"], resolved["fps"]) == (704, 1280, 121, 24)
    assert resolved["num_inference_steps"] == 3
    assert resolved["negative_prompt"] == WAN_NEGATIVE_PROMPT_CN  # Wan2.2's own, as FastVideo's presets use


def test_an_omitted_negative_prompt_is_the_models_default_and_is_not_counted_against_the_limit():
    wan21 = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    limits = Limits(max_prompt_chars=100, max_pixel_frames=832 * 480 * 81, models=(wan21,))
    resolved = resolve(RenderRequest(prompt="a cat", seed=1), wan21, "t", limits)
    assert resolved["negative_prompt"] == WAN_NEGATIVE_PROMPT_EN and len(WAN_NEGATIVE_PROMPT_EN) > 100
    given = resolve(RenderRequest(prompt="a cat", seed=1, negative_prompt=""), wan21, "t", limits)
    assert given["negative_prompt"] == ""  # asked for none: none
    assert object_key(given) != object_key(resolved)


def test_wan22_sizes_must_be_multiples_of_32_and_every_bad_side_is_named():
    assert fastwan22(height=736, width=1280)["height"] == 736
    with pytest.raises(InvalidRequest) as info:
        fastwan22(height=720, width=1296)  # multiples of 16, which Wan2.1 accepts, but not of 32
    assert str(info.value) == (
        "invalid render request: height: 720 is not a multiple of 32, which FastVideo/FastWan2.2-TI2V-5B-Diffusers "
        "needs (for example 704); width: 1296 is not a multiple of 32, which FastVideo/FastWan2.2-TI2V-5B-Diffusers "
        "needs (for example 1280)"
    )
    assert spec(height=80, width=48)["height"] == 80  # tiny-wan (Wan2.1 shapes): multiples of 16


def test_every_rejection_here_carries_the_documented_prefix():
    with pytest.raises(InvalidRequest, match=r"^invalid render request: model: "):
        spec(model="other")
    with pytest.raises(InvalidRequest, match=r"^invalid render request: size: "):
        spec(height=1920, width=1920, num_frames=257)


def test_every_problem_at_once_and_no_rule_on_a_field_that_failed_the_schema():
    from tasks.schemas import check_fields

    request, given, problems = check_fields({"prompt": "x" * 101, "model": "nope", "width": 100, "num_frames": 8})
    assert request is None and [p.field for p in problems] == ["num_frames", "width"]
    found = request_problems(given, "tiny-wan", LIMITS, {p.field for p in problems})
    # No size rule nor pixel budget from width or frames the schema refused (defaults would stand in).
    assert [str(p) for p in found] == [
        "model: 'nope' is not served by this queue; available: tiny-wan",
        "prompt: 101 characters; at most 100 are allowed",
    ]
