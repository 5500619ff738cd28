"""The shared shape of the render's bounded in-process retries (out of memory, a dead Ray worker)."""

from __future__ import annotations

import pytest

from tasks.engines.second_try import describe_size, with_one_more_try


class Flaky(Exception):
    pass


class GaveUp(Exception):
    pass


def run(outcomes: list[object]) -> tuple[object, list[str]]:
    """Run ``with_one_more_try`` over attempts that raise or return ``outcomes`` in turn."""
    calls: list[str] = []

    def attempt() -> object:
        calls.append("attempt")
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def before_retry(exc: Exception) -> None:
        calls.append(f"before_retry({exc})")

    def give_up(exc: Exception) -> Exception:
        calls.append(f"give_up({exc})")
        return GaveUp(f"gave up after {exc}")

    try:
        return with_one_more_try(attempt, lambda exc: isinstance(exc, Flaky), before_retry, give_up), calls
    except Exception as exc:  # noqa: BLE001 - the test reports what came out
        return exc, calls


def test_a_first_success_is_returned_without_a_retry():
    assert run(["video"]) == ("video", ["attempt"])


def test_a_matching_failure_gets_exactly_one_more_try():
    assert run([Flaky("a"), "video"]) == ("video", ["attempt", "before_retry(a)", "attempt"])


def test_the_same_failure_twice_ends_with_the_give_up_error():
    result, calls = run([Flaky("a"), Flaky("b"), "never reached"])
    assert isinstance(result, GaveUp) and str(result) == "gave up after b"
    assert result.__cause__ is None and result.__suppress_context__
    assert calls == ["attempt", "before_retry(a)", "attempt", "give_up(b)"]


@pytest.mark.parametrize("outcomes", [[ValueError("x")], [Flaky("a"), ValueError("x")]])
def test_any_other_failure_is_raised_as_it_is(outcomes):
    result, calls = run(outcomes)
    assert type(result) is ValueError and str(result) == "x"
    assert not any(c.startswith("give_up") for c in calls)


def test_the_size_is_named_as_the_error_messages_name_it():
    spec = {"width": 512, "height": 288, "num_frames": 65, "num_inference_steps": 30}
    assert describe_size(spec) == "512x288 x 65 frames (30 steps)"
