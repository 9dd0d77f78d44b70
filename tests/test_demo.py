"""The main job: PER erases the planted concept exactly inside the detection and nowhere else; steering moves
activations further out of distribution."""

import io

from sae_core.__main__ import main
from sae_core.demo import run_demo


def test_demo_reproduces_the_papers_claim_on_the_planted_world(tmp_path):
    rows = {r.method: r for r in run_demo(tmp_path, images=2, grid=(6, 10), width=32, latents=64)}
    per = rows["PER (random, paper default)"]
    steer = rows["SAeUron steer gamma=-10"]
    legacy = rows["SAeUron steer gamma=-10 legacy"]
    assert per.detection_iou == 1.0 and per.concept_left < 1e-5 and per.max_change_outside == 0.0
    assert steer.max_change_outside == 0.0  # preserve error term: untouched patches bit-identical
    assert legacy.max_change_outside > 0.0  # the published sign slip moves every patch
    assert steer.norm_w1 > 5 * per.norm_w1 and legacy.norm_w1 > steer.norm_w1
    assert (tmp_path / "planted_comparison.png").stat().st_size > 1000


def test_demo_command_prints_the_table(tmp_path):
    out = io.StringIO()
    assert main(["demo", "--out", str(tmp_path), "--images", "2"], out=out) == 0
    text = out.getvalue()
    assert "PER (random, paper default)" in text and "norm W1" in text and "planted_comparison.png" in text
