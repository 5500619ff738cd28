"""The documentation stays true to the code."""

from __future__ import annotations

from tests.support import ROOT
from worker_config.settings import Settings


def test_every_setting_is_documented():
    text = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"`{name}`" not in text]
    assert not missing, f"add these to docs/settings.md: {missing}"


def test_every_request_field_is_documented():
    from tasks.schemas import RenderRequest

    text = (ROOT / "docs" / "api.md").read_text()
    assert not [name for name in RenderRequest.model_fields if f"| `{name}` |" not in text]


def test_the_hostile_requests_table_is_what_the_queue_test_sends():
    from tests.test_bad_input_queue import HOSTILE, POSITIONAL

    text = (ROOT / "docs" / "api.md").read_text()
    table = text.split("## Hostile requests", 1)[1].split("\n## ", 1)[0]
    rows = [
        tuple(cell.strip() for cell in line.strip("|").split(" | ", 1))
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| request |") and "refused by the worker" not in line
    ]
    documented = [(label, message.strip("`").replace("\\|", "|")) for label, message in rows]  # | escaped in tables
    assert documented == [(label, expected) for label, _, expected in HOSTILE] + [POSITIONAL]
