"""Request validation: every field typed and bounded, messages name the field and the rule."""

from __future__ import annotations

import pytest

from tasks.errors import InvalidRequest
from tasks.schemas import RenderRequest, parse_request

# (kwargs, text the error must contain)
BAD_REQUESTS = [
    ({}, "prompt: required"),
    ({"prompt": ""}, "prompt: String should have at least 1 character"),
    ({"prompt": "   "}, "prompt: prompt is blank"),
    ({"prompt": 42}, "prompt: Input should be a valid string"),
    ({"prompt": "x\x00y"}, "prompt: prompt contains control character '\\x00'"),
    ({"prompt": "x\x1b[31m"}, "control character '\\x1b'"),
    ({"prompt": "x" * 100_001}, "prompt: String should have at most 100000 characters"),
    ({"prompt": "x", "negative_prompt": "\x07"}, "negative_prompt: negative_prompt contains control character"),
    ({"prompt": "x", "height": 17}, "height: Input should be a multiple of 16"),
    ({"prompt": "x", "width": 0}, "width: Input should be greater than or equal to 16"),
    ({"prompt": "x", "width": -32}, "width: Input should be greater than or equal to 16"),
    ({"prompt": "x", "height": 4096}, "height: Input should be less than or equal to 1920"),
    ({"prompt": "x", "height": "480"}, "height: Input should be a valid integer"),
    ({"prompt": "x", "height": 480.0}, "height: Input should be a valid integer"),
    ({"prompt": "x", "height": True}, "height: Input should be a valid integer"),
    ({"prompt": "x", "num_frames": 80}, "num_frames: Wan needs a frame count of the form 4k+1"),
    ({"prompt": "x", "num_frames": 0}, "num_frames: Input should be greater than or equal to 1"),
    ({"prompt": "x", "num_frames": 100_001}, "num_frames: Input should be less than or equal to 257"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps: Input should be greater than or equal to 1"),
    ({"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps: Input should be less than or equal to 200"),
    ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale: Input should be greater than or equal to 0"),
    ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale: Input should be a finite number"),
    ({"prompt": "x", "guidance_scale": "5"}, "guidance_scale: Input should be a valid number"),
    ({"prompt": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"prompt": "x", "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
    ({"prompt": "x", "fps": 0}, "fps: Input should be greater than or equal to 1"),
    ({"prompt": "x", "model": ""}, "model: String should have at least 1 character"),
    ({"prompt": "x", "force": "yes"}, "force: Input should be a valid boolean"),
    ({"prompt": "x", "resolution": "4k"}, "resolution: unknown field; allowed fields: prompt, negative_prompt"),
    ({"prompt": "x", "__class__": "os.system"}, "__class__: unknown field"),
    # Invisible and bidirectional formatting characters: text that reads otherwise than it is.
    (
        {"prompt": "pay \u202egnp.exe"},
        "prompt: prompt contains the invisible or bidirectional formatting character "
        "U+202E (RIGHT-TO-LEFT OVERRIDE); only printable text",
    ),
    (
        {"prompt": "a\u200bcat"},
        "prompt contains the invisible or bidirectional formatting character U+200B (ZERO WIDTH",
    ),
    ({"prompt": "a\u2066cat\u2069"}, "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ({"prompt": "x", "negative_prompt": "\ufeffblur"}, "negative_prompt: negative_prompt contains the invisible"),
    # A value that breaks two rules is told both.
    ({"prompt": "x", "height": -1}, "height: Input should be greater than or equal to 16 and a multiple of 16"),
    (
        {"prompt": "x", "num_frames": 10_000},
        "num_frames: Input should be less than or equal to 257; Wan needs a "
        "frame count of the form 4k+1 (1, 5, 9, ..., 81, ...); 10000 is not",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), BAD_REQUESTS, ids=[e for _, e in BAD_REQUESTS])
def test_bad_request_is_rejected_with_the_field_named(kwargs, expected):
    with pytest.raises(InvalidRequest) as info:
        parse_request(kwargs)
    assert expected in str(info.value)
    assert str(info.value).startswith("invalid render request: ")


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidRequest) as info:
        parse_request({"prompt": "x", "height": 17, "width": 9, "extra": 1})
    message = str(info.value)
    assert "height:" in message and "width:" in message and "extra: unknown field" in message


def test_joiners_that_scripts_and_emoji_need_are_printable_text():
    for prompt in (
        "می\u200cخواهم یک گربه",
        "क्\u200dष",
        "a family \U0001f468\u200d\U0001f469\u200d\U0001f467 at the beach",
    ):
        assert parse_request({"prompt": prompt}).prompt == prompt


def test_good_request_keeps_values_and_normalises_numbers():
    request = parse_request(
        {"prompt": "a cat\twith\nlines", "height": 480, "width": 832, "num_frames": 81, "guidance_scale": 5, "seed": 0}
    )
    assert request.guidance_scale == 5.0 and isinstance(request.guidance_scale, float)
    assert (request.height, request.width, request.num_frames, request.seed) == (480, 832, 81, 0)
    assert request.negative_prompt is None and request.force is False


@pytest.mark.parametrize("frames", [1, 5, 9, 81, 257])
def test_frame_counts_of_the_form_4k_plus_1_are_accepted(frames):
    assert RenderRequest(prompt="x", num_frames=frames).num_frames == frames
