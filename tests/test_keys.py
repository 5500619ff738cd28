"""Spec resolution and key derivation: defaults from the model profile, limits, stable keys."""

from __future__ import annotations

import re

import pytest

from tasks.errors import InvalidRequest
from tasks.keys import object_key, resolve, seed_for_task
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
