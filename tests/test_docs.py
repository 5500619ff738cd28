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


def test_every_worker_metric_is_in_the_monitoring_table():
    import re

    source = (ROOT / "tasks" / "worker" / "metrics.py").read_text()
    created = set(re.findall(r'"(renderfarm_[a-z_]+)"', source))
    counters = set(re.findall(r'Counter\(\s*"(renderfarm_[a-z_]+)"', source))  # exposed with _total
    text = (ROOT / "docs" / "monitoring.md").read_text()
    shown = set(re.findall(r"^\| `(renderfarm_[a-z_]+)` \|", text, re.M))
    assert {f"{name}_total" if name in counters else name for name in created} == shown


def test_each_readme_python_snippet_stands_alone():
    """Every name a README snippet uses is imported or assigned in that snippet (issue 25.8)."""
    import ast
    import builtins
    import re

    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(snippets) >= 5
    for snippet in snippets:
        tree = ast.parse(snippet)
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert used <= bound, (used - bound, snippet)
