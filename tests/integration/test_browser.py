"""The frontend acceptance check (tools/browser_check.py) under pytest: skipped when Chromium, Node.js or
playwright-core are absent (set CHROMIUM / PLAYWRIGHT_DIR to enable it)."""

import pytest

from tools import browser_check


def test_workflows_open_and_widgets_behave_in_the_real_frontend(tmp_path):
    try:
        browser_check.prerequisites()
    except browser_check.Skip as e:
        pytest.skip(str(e))
    report = browser_check.check(tmp_path / "shots")
    assert report["problems"] == [], report["problems"]
    assert set(report["workflows"]) == {p.stem for p in browser_check.WF_DIR.glob("*.json")}
