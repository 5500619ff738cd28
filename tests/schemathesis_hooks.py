"""Hooks for the schemathesis run against the videos API (tests/test_api.py, ``SCHEMATHESIS_HOOKS``).

The served schema says ``size`` and ``seconds`` are strings, and schemathesis draws them from all of
Unicode, where the values that once crashed the gateway (issue 26) are needles in a haystack. Half of
the create bodies it sends are drawn here instead: every kind of digit (superscripts, Arabic-Indic,
fullwidth), numbers in exponent form and numbers thousands of digits long, in both string fields.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

# Every kind of digit: ASCII, Arabic-Indic, Devanagari, fullwidth (Nd), superscripts (No).
DIGITS = st.text(st.characters(categories=["Nd"]) | st.sampled_from("¹²³⁴"), min_size=1, max_size=4)
HUGE = st.integers(4300, 6000).map(lambda n: "9" * n)  # past Python's int-string limit
SIDE = st.one_of(st.integers(16, 1920).map(str), DIGITS, HUGE)
NUMBERS = st.one_of(
    st.floats().map(repr),  # 1e+308, inf, nan, -0.0, 5e-324
    st.integers(-(10**40), 10**40).map(str),
    HUGE,
    st.sampled_from(["1e308", "1E308", "1_0", "0x10", "+4", " 4", "4\n", "4.", ".5"]),
)
HOSTILE = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=20),
        "size": st.builds(lambda w, h: f"{w}x{h}", SIDE, SIDE) | NUMBERS,
        "seconds": DIGITS | NUMBERS,
    },
    optional={"model": st.sampled_from(["tiny-wan", "nope/none"])},
)


@schemathesis.hook
def before_generate_body(context: Any, strategy: st.SearchStrategy) -> st.SearchStrategy:
    operation = context.operation
    if operation is None or operation.method.upper() != "POST" or operation.path != "/v1/videos":
        return strategy
    return st.one_of(strategy, HOSTILE)
