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
