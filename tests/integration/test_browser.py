"""The frontend acceptance check (tools/browser_check.py) under pytest, on the classic canvas and under Nodes 2.0
(the Vue node renderer): skipped when Chromium, Node.js or playwright-core are absent (set CHROMIUM /
PLAYWRIGHT_DIR to enable it). COMFY_FRONTEND_ROOT, when set, names another comfyui-frontend-package build's
static folder to serve instead of the installed one (e.g. the newest release)."""

import os

import pytest

from tools import browser_check


@pytest.mark.parametrize("vue_nodes", [False, True], ids=["classic", "nodes2"])
def test_workflows_open_and_widgets_behave_in_the_real_frontend(tmp_path, vue_nodes):
    try:
        browser_check.prerequisites()
    except browser_check.Skip as e:
        pytest.skip(str(e))
    report = browser_check.check(tmp_path / "shots", frontend_root=os.environ.get("COMFY_FRONTEND_ROOT") or None,
                                 vue_nodes=vue_nodes)
    if vue_nodes and (not report.get("vue_nodes_active") or report.get("renderer_shows_nothing")):
        pytest.skip(f"frontend {report.get('frontend_version')} has no working Nodes 2.0 renderer: {report['problems'][:1]}")
    assert report["problems"] == [], report["problems"]
    assert set(report["workflows"]) == {p.stem for p in browser_check.WF_DIR.glob("*.json")}
