"""Shapes world SAE, concepts, erasure metrics and demo, end to end at reduced size on the shipped model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from sae_core.concepts import load_concepts  # noqa: E402
from sae_core.formats import load_sae  # noqa: E402
from shapes_world import artifacts, erasure, learn  # noqa: E402
from shapes_world.demo import run_demo  # noqa: E402
from shapes_world.model import load_model  # noqa: E402
from shapes_world.render import render  # noqa: E402
from shapes_world.sample import sample  # noqa: E402
from shapes_world.scenes import COLOURS, SHAPES, generate_scenes  # noqa: E402

WEIGHTS = Path(learn.__file__).parent / "weights"
SHAPE_BLOCK = "up_blocks.0.attentions.1"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_model(WEIGHTS)[0]


@pytest.fixture(scope="module")
def tiny_world_dir(model, tmp_path_factory):
    """A reduced SAE (64 latents) and concept files built by the same code as the shipped ones."""
    out = tmp_path_factory.mktemp("world")
    s = learn.LearnSettings(activation_captions=4, concept_captions=16, n_latents=64, k=4, sae_steps=30,
                            sae_batch=256, sae_rows=20_000)
    summary = learn.build(model, out, s)
    return out, summary


def test_tap_records_cond_rows_of_every_step(model):
    caps = generate_scenes(3, seed=1).captions
    tap = learn.ActivationTap()
    render(model, caps, steps=4, interventions={learn.BLOCK: tap})
    acts = tap.tensor()
    assert acts.shape == (4 * 3 * 16 * 16, 64)
    # the first call's rows are the cond rows of step 1: compare with a plain forward hook
    seen = []
    h = dict(model.unet.named_modules())[learn.BLOCK].register_forward_hook(lambda m, a, o: seen.append(o[0][:3].clone()))
    try:
        sample(model, caps, steps=4)
    finally:
        h.remove()
    ref = seen[0].permute(0, 2, 3, 1).reshape(-1, 64).half()
    torch.testing.assert_close(acts[: ref.shape[0]], ref, rtol=0, atol=0)


def test_render_detect_only_is_bit_identical_and_leaves_no_hook(model, tiny_world_dir):
    world = erasure.load_world(tiny_world_dir[0], ["red"])
    caps = generate_scenes(2, seed=3).captions
    plain = sample(model, caps, seed=5, steps=3)
    with_det = render(world.model, caps, seed=5, steps=3,
                      interventions={world.block: erasure.intervention(world, "red", None)})
    torch.testing.assert_close(with_det, plain, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in world.model.unet.modules())


def test_render_removes_hooks_after_an_error(model):
    def boom(block_in, block_out, step):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        render(model, ["a red circle"], steps=2, interventions={learn.BLOCK: boom})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.unet.modules())


def test_build_writes_loadable_sae_and_concepts(tiny_world_dir):
    out, summary = tiny_world_dir
    sae = load_sae(out / learn.SAE_NAME)
    assert (sae.cfg.n_latents, sae.cfg.k, sae.cfg.d_in) == (64, 4, 64)
    assert sae.cfg.provenance["block"] == learn.BLOCK
    for c in SHAPES + COLOURS:
        d = load_concepts(out / learn.CONCEPT_DIR / f"{c}.safetensors", sae=sae)
        assert d.names == (c,)
        assert d.meta.selection["method"] == "specific"
        assert all(c in learn.names_in(p) for p in d.meta.prompts[c])
        assert not any(c in learn.names_in(p) for p in d.meta.prompts[learn.CONTRAST])
    assert json.loads((out / "sae_summary.json").read_text())["fvu"] == pytest.approx(summary["fvu"])


def test_metric_helpers_against_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    b[1] = a[1]
    mse = ((a.numpy() - b.numpy()) ** 2).reshape(3, -1).mean(-1)
    ref = [10 * math.log10(1 / m) if m > 0 else erasure.PSNR_CAP for m in mse]
    np.testing.assert_allclose(erasure.psnr(a, b).numpy(), ref, rtol=1e-5)
    pooled = 10 * math.log10(1 / ((a.double().numpy() - b.double().numpy()) ** 2).mean())
    assert erasure.pooled_psnr(a, b) == pytest.approx(pooled, rel=1e-9)
    assert erasure.pooled_psnr(a, a) == erasure.PSNR_CAP
    pix = torch.zeros(1, 4, 4, dtype=torch.bool)
    pix[0, 0, :2] = True  # half of the top-left 2x2 patch
    pix[0, 2:, 2:] = True  # all of the bottom-right one
    assert erasure.patch_mask(pix, (2, 2))[0].tolist() == [[True, False], [False, True]]
    counts = torch.tensor([0, 1, 2, 3, 50] + [0] * 15)
    assert erasure.artifact_threshold(counts) == max(erasure.MIN_PIXELS, int(np.quantile(counts.numpy(), 0.95)) + 1)
    sm = torch.tensor([[[1, 2], [0, 1]]])
    cm = torch.tensor([[[3, 3], [0, 1]]])
    assert erasure.target_pixels(sm, cm, "circle").tolist() == [[[True, False], [False, True]]]
    assert erasure.target_pixels(sm, cm, "blue").tolist() == [[[True, True], [False, False]]]
    with pytest.raises(KeyError, match="unknown concept 'dog'"):
        erasure.target_pixels(sm, cm, "dog")


def test_prompt_sets_are_deterministic_and_split_by_concept():
    t, o = erasure.prompt_sets("cross", 5, 3)
    assert (t, o) == erasure.prompt_sets("cross", 5, 3)
    assert len(t) == 5 and len(o) == 3
    assert all("cross" in learn.names_in(c) for c in t) and not any("cross" in learn.names_in(c) for c in o)


def test_evaluate_concept_is_repeatable_and_in_range(tiny_world_dir):
    world = erasure.load_world(tiny_world_dir[0], ["red"])
    t, o = erasure.prompt_sets("red", 2, 1)
    methods = erasure.methods_for([-4.0], [-2.0])
    methods = {k: v for k, v in methods.items() if k in ("PER random", "SAeUron scale -4", "unbox add -2")}
    r1, imgs = erasure.evaluate_concept(world, "red", t, o, methods, steps=3, artifact_pixels=40)
    r2, _ = erasure.evaluate_concept(world, "red", t, o, methods, steps=3, artifact_pixels=40)
    assert r1 == r2
    assert set(imgs) == {"original", *methods}
    for name in methods:
        m = r1.methods[name]
        for k in ("erasure_rate", "preservation", "artifact_rate", "artifact_rate_judge"):
            assert math.isnan(m[k]) or 0.0 <= m[k] <= 1.0
        assert set(m["judge_reasons"]) == set(artifacts.REASONS)
        assert m["ood_distance"] >= 0.0 and m["unchanged_psnr_db"] <= erasure.PSNR_CAP


def test_load_world_errors(tmp_path, tiny_world_dir):
    with pytest.raises(KeyError, match=r"no concept file for \['zebra'\]"):
        erasure.load_world(tiny_world_dir[0], ["zebra"])
    (tmp_path / learn.CONCEPT_DIR).mkdir()
    (tmp_path / learn.SAE_NAME).write_bytes((tiny_world_dir[0] / learn.SAE_NAME).read_bytes())
    with pytest.raises(FileNotFoundError, match="no concept files; build them"):
        erasure.load_world(tmp_path)


def test_demo_end_to_end_at_reduced_size(tiny_world_dir, tmp_path):
    import io

    buf = io.StringIO()
    res = run_demo(tmp_path / "demo", "red", targets=2, others=1, steps=3, weights=tiny_world_dir[0], out=buf)
    assert (tmp_path / "demo" / "comparison.png").is_file()
    assert sorted(p.name for p in (tmp_path / "demo").glob("masks_*.png")) == ["masks_0.png", "masks_1.png"]
    text = buf.getvalue()
    assert "Patch Replacer (recommended)" in text and "Patch Replacer (paper: random)" in text and "SAE Steer unbox" in text
    assert set(res["methods"]) == {k for k in res["methods"]}  # keys present
    assert len(res["methods"]) == 4


def test_shipped_world_loads_when_built():
    if not (WEIGHTS / learn.SAE_NAME).is_file():
        pytest.skip("no shipped SAE yet")
    world = erasure.load_world()
    assert set(world.concepts) == set(SHAPES + COLOURS)
    for c, d in world.concepts.items():
        d.check_compatible(world.sae_for(c))
    # colours on the colour SAE's 16x16 block; shapes on the shape SAE's 8x8 block (weights/shapes/)
    assert {world.block_for(c) for c in COLOURS} == {learn.BLOCK}
    assert set(world.hooks) == set(SHAPES)
    assert {world.block_for(c) for c in SHAPES} == {SHAPE_BLOCK}
    assert world.sae_for("circle").cfg.provenance["block"] == SHAPE_BLOCK
    # the recommended PER keeps the other concepts of the kind, each learned with the concept's own SAE
    assert erasure.PER_DEFAULT.keep_others
    assert erasure.others_to_keep(world, "circle") == ["square", "triangle", "cross"]
    assert erasure.others_to_keep(world, "cyan") == ["red", "green", "blue", "yellow", "purple"]
    from sae_core.intervention import ReplaceSettings

    iv = erasure.intervention(world, "circle", ReplaceSettings("background"), keep_others=True)
    assert [n for d, _ in iv.detector.keep for n in d.names] == ["square", "triangle", "cross"]
    for d, _ in iv.detector.keep:
        d.check_compatible(world.sae_for("circle"))
    assert erasure.intervention(world, "circle", ReplaceSettings("background")).detector.keep == []


def test_subfolder_sae_brings_its_concepts_and_block(tiny_world_dir, tmp_path):
    import dataclasses
    import shutil

    from sae_core.formats import save_native
    from sae_core.sae import SparseAutoencoder

    top = tmp_path / "w"
    shutil.copytree(tiny_world_dir[0], top)
    sae = load_sae(top / learn.SAE_NAME)
    # the same weights (so the concept file binds to it) recorded for another block
    cfg = dataclasses.replace(sae.cfg, provenance={**sae.cfg.provenance, "block": "up_blocks.0.attentions.0"})
    other = SparseAutoencoder(cfg, W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    (top / "sub" / learn.CONCEPT_DIR).mkdir(parents=True)
    save_native(other, top / "sub" / learn.SAE_NAME)
    shutil.copy(top / learn.CONCEPT_DIR / "circle.safetensors", top / "sub" / learn.CONCEPT_DIR / "circle.safetensors")
    world = erasure.load_world(top, ["circle", "red"])
    assert set(world.hooks) == {"circle"}
    assert world.block_for("circle") == "up_blocks.0.attentions.0" and world.block_for("red") == learn.BLOCK
    assert world.sae_for("circle") is world.hooks["circle"][0] and world.sae_for("red") is world.sae
    assert world.sae_for("circle") is not world.sae
    # the intervention runs on the concept's own SAE; the default pair stays for every other concept
    assert erasure.intervention(world, "circle", None).sae is world.sae_for("circle")
    assert erasure.intervention(world, "red", None).sae is world.sae
    # the other concepts of each kind come along; those to keep come from the concept's own SAE only: circle's SAE
    # here holds no other shape
    assert set(world.concepts) == set(SHAPES + COLOURS)
    assert erasure.others_to_keep(world, "circle") == []
    assert erasure.others_to_keep(world, "red") == [c for c in COLOURS if c != "red"]
    assert erasure.others_to_keep(world, "square") == ["triangle", "cross"]


def test_object_share_counts_firings_on_object_patches():
    from sae_core.config import SAEConfig
    from sae_core.intervention import StepInfo
    from sae_core.sae import SparseAutoencoder

    g = torch.Generator().manual_seed(3)
    d, m = 8, 16
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=m, k=4, activation="relu_topk"),
                            W_enc=torch.randn(m, d, generator=g), b_enc=torch.zeros(m),
                            W_dec=torch.randn(m, d, generator=g), b_dec=torch.zeros(d))

    class Labels:  # an evaluator whose object is the top-left quarter of a 4x4 image
        def label(self, images):
            sm = torch.zeros(images.shape[0], 4, 4, dtype=torch.long)
            sm[:, :2, :2] = 1
            return sm, sm

    share = learn.ObjectShare(sae, Labels())
    x = torch.randn(2, d, 2, 2, generator=g)  # [cond; uncond] rows, a 2x2 grid
    assert share(None, x, StepInfo(500.0, None, (0, 1))) is x
    share.image_done(torch.zeros(1, 3, 4, 4))
    fires = (sae.encode(x[:1].permute(0, 2, 3, 1)) > 0)[0]  # cond row only, [2, 2, M]
    on, tot = fires[0, 0].double(), fires.flatten(0, 1).sum(0).double()  # patch (0, 0) is the object patch
    ref = torch.where(tot > 0, on / tot.clamp_min(1), torch.zeros_like(tot))
    torch.testing.assert_close(share.share(torch.tensor([500.0]))[0], ref)
    with pytest.raises(ValueError, match="no codes recorded at timesteps"):
        share.share(torch.tensor([100.0]))


@pytest.mark.skipif(not (WEIGHTS / "shapes" / learn.SAE_NAME).is_file(), reason="no shipped shape SAE")
def test_shipped_shape_concepts_localise():
    """At least two shapes detect with IoU >= 0.6 on held-out prompts (reduced: 4 prompts, 10 steps; the full
    measure is in the README's Shapes world section)."""
    world = erasure.load_world(concepts=list(SHAPES))
    ious = {}
    for c in SHAPES:
        t, _ = erasure.prompt_sets(c, 4, 0)
        r, _ = erasure.evaluate_concept(world, c, t, [], {}, steps=10, artifact_pixels=40)
        ious[c] = r.detection_iou
    assert sum(v >= 0.6 for v in ious.values()) >= 2, ious


def test_bench_erasure_quick_run_writes_json(tiny_world_dir, tmp_path, bench_script):
    bench = bench_script("erasure")

    out = bench.main(["--weights", str(tiny_world_dir[0]), "--concepts", "red", "--targets", "2", "--others", "1",
                      "--steps", "2", "--scale", "-4", "--add", "-2", "--calibration", "4", "--json", str(tmp_path / "e.json")])
    data = json.loads((tmp_path / "e.json").read_text())
    for part in ("per", "steer"):
        for k in ("erasure_rate", "preservation", "unchanged_psnr_db", "detection_iou", "artifact_rate", "ood_distance",
                  "artifact_rate_judge", "judge_reasons"):
            assert k in data[part]
    assert data["steer"]["best"] in data["steer"]["sweep"]
    assert out["per"]["detection_iou"] == data["per"]["detection_iou"]
    # PER alone, with other edit settings: no steering summary, the mask settings reach the edits
    per_only = bench.main(["--weights", str(tiny_world_dir[0]), "--concepts", "red", "--targets", "2", "--others", "1",
                           "--steps", "2", "--scale", "--add", "--calibration", "4", "--padding", "0", "--min-region", "0",
                           "--block-only"])
    assert per_only["steer"] == {} and per_only["settings"]["padding"] == 0
    assert set(per_only["per"]["modes"]) == {"PER random", "PER nearest", "PER mean", "PER background",
                                             erasure.PER_BLOCK_ONLY_NAME, erasure.PER_DEFAULT_NAME}
    assert per_only["per"]["config"] == erasure.PER_DEFAULT_NAME
    assert erasure.PER_BLOCK_ONLY_NAME not in data["per"]["modes"]  # only with --block-only


def test_window_outside_every_step_leaves_images_identical(tiny_world_dir):
    from sae_core.intervention import ReplaceSettings, StepWindow

    world = erasure.load_world(tiny_world_dir[0], ["red"])
    t, o = erasure.prompt_sets("red", 2, 1)
    r, imgs = erasure.evaluate_concept(world, "red", t, o, {"PER": ReplaceSettings("random")}, steps=3,
                                       artifact_pixels=40, detection=erasure.RAW_DETECTION,
                                       window=StepWindow(timestep_min=2000.0))
    torch.testing.assert_close(imgs["PER"], imgs["original"], rtol=0, atol=0)
    m = r.methods["PER"]
    assert m["unchanged_identical"] == 1.0 and m["unchanged_psnr_db"] == erasure.PSNR_CAP and m["ood_distance"] == 0.0


def test_bench_artifact_judge_quick_run(tmp_path, bench_script):
    artifact_judge = bench_script("artifact_judge")

    out = artifact_judge.main(["--clean", "24", "--renders", "3", "--steps", "2", "--concepts", "--json",
                               str(tmp_path / "j.json")])
    data = json.loads((tmp_path / "j.json").read_text())
    assert data["clean"]["rates"]["artifact"] == 0.0 == out["clean"]["rates"]["artifact"]
    assert sum(v["n"] for v in data["renders"]["by_background"].values()) == 3
    assert set(data["renders"]["rates"]) == {"artifact", *artifacts.REASONS}


def test_shipped_gate_leaves_images_without_the_concept_bit_identical_through_diffusers_hooks():
    """The recommended PER (presence gate + look-ahead) on the shipped model and concept: the prompts without red
    come out bit-identical, the one with red does not."""
    world = erasure.load_world(concepts=["red"])
    assert world.concepts["red"].has_gate
    t, o = erasure.prompt_sets("red", 1, 3)
    res, imgs = erasure.evaluate_concept(world, "red", t, o, {"rec": erasure.PER_DEFAULT}, steps=20, artifact_pixels=40)
    torch.testing.assert_close(imgs["rec"][1:], imgs["original"][1:], rtol=0, atol=0)
    assert not torch.equal(imgs["rec"][0], imgs["original"][0])
    assert res.methods["rec"]["unchanged_identical"] == 1.0


def test_negative_rates_group_images_by_other_concept():
    """Per other concept, the rates over the kept images that show it and not the concept being learned; an
    image with two other concepts counts in both groups, a group with too few images is left out."""
    from sae_core.concept_stats import ConceptStatsAccumulator

    M = 8
    acc = ConceptStatsAccumulator(M, keep_samples=True, sample_top=M)
    caps = ["a purple circle and a blue square on a black background",  # shows purple: in no group
            "a blue square on a white background", "a blue circle and a red cross on a grey background"]
    caps += [f"a red square on a {bg} background" for bg in ("black", "white", "grey")] * 3
    g = torch.Generator().manual_seed(0)
    codes = {}
    for i, cap in enumerate(caps):
        for t in (900.0, 10.0):
            c = (torch.rand(1, 2, 2, M, generator=g) > 0.6).float() * torch.rand(1, 2, 2, M, generator=g)
            acc.add(cap, t, c, sample=i)
            codes[(i, t)] = c
    ts = torch.tensor([900.0, 10.0], dtype=torch.float64)
    got = learn._negative_rates(acc, "purple", ts)
    groups = {}
    for i, cap in enumerate(caps):
        shown = learn.names_in(cap)
        if "purple" not in shown:
            for o in shown:
                groups.setdefault(o, []).append(i)
    kept = [o for o in sorted(groups) if len(groups[o]) >= learn.NEGATIVE_MIN_IMAGES]
    assert kept == ["red", "square"]  # blue (2 images), circle (1), cross (1) have too few
    for gi, o in enumerate(kept):
        for ti, t in enumerate((900.0, 10.0)):
            rows = torch.cat([codes[(i, t)].reshape(-1, M) for i in groups[o]])
            torch.testing.assert_close(got[gi, ti], (rows > 0).double().mean(0))


def test_per_detects_with_the_share_for_its_sae_and_steering_without(tiny_world_dir):
    from dataclasses import replace
    from types import SimpleNamespace

    from sae_core.intervention import ReplaceSettings
    from sae_core.steer import SteerSettings

    world = erasure.load_world(tiny_world_dir[0], ["red"])
    sae = world.sae_for("red")
    k = int(sae.cfg.k)
    per = erasure.intervention(world, "red", ReplaceSettings("background"))
    assert per.detector.settings == replace(erasure.DETECTION, min_share=erasure.SHARE_PER_KEPT / k)
    steer = erasure.intervention(world, "red", SteerSettings("saeuron_scale", -16.0))
    assert steer.detector.settings == erasure.DETECTION
    own = replace(erasure.DETECTION, min_share=0.5)
    assert erasure.replace_detection(own, sae) == own
    dense = SimpleNamespace(cfg=SimpleNamespace(k=None))  # an SAE without TopK: no share of k latents
    assert erasure.replace_detection(erasure.DETECTION, dense) == erasure.DETECTION


def test_evaluate_concept_detects_against_the_kind_only_where_the_method_asks(tiny_world_dir, monkeypatch):
    """Method.keep_others reaches the detector through evaluate_concept (the benchmark's path), with the other
    colours of a world loaded for red alone; other methods keep nothing."""
    from sae_core.intervention import ReplaceSettings

    world = erasure.load_world(tiny_world_dir[0], ["red"])
    seen = []
    real = erasure.ConceptDetector

    def spy(*args, keep=None, **kw):
        seen.append(None if keep is None else [n for d, _ in keep for n in d.names])
        return real(*args, keep=keep, **kw)

    monkeypatch.setattr(erasure, "ConceptDetector", spy)
    t, o = erasure.prompt_sets("red", 1, 1)
    methods = {"kept": erasure.Method(ReplaceSettings("background"), keep_others=True),
               "plain": ReplaceSettings("background")}
    erasure.evaluate_concept(world, "red", t, o, methods, steps=2, artifact_pixels=40)
    others = [c for c in COLOURS if c != "red"]
    assert seen == [None, others, None]  # the raw detection (IoU), then the two methods


def test_block_side_matches_the_feature_maps_the_model_computes(model):
    """block_side against the spatial size of every attention / resnet block's output in one forward pass."""
    seen = {}
    def hook(name):
        def keep(mod, args, out):  # returns None: the output stays as computed
            seen.setdefault(name, (out[0] if isinstance(out, tuple) else out).shape)
        return keep

    import re

    block = re.compile(r"((down|up)_blocks\.\d+|mid_block)\.(attentions|resnets)\.\d+|mid_block")
    hooks = [m.register_forward_hook(hook(n)) for n, m in model.unet.named_modules() if block.fullmatch(n)]
    try:
        sample(model, generate_scenes(1, seed=2).captions, steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) > 8
    for name, shape in seen.items():
        assert shape[-1] == shape[-2] == erasure.block_side(model, name), name
    for bad in ("up_blocks.7.attentions.0", "conv_in", "up_blocks"):
        with pytest.raises(ValueError, match="is not a block of the shapes model"):
            erasure.block_side(model, bad)


def test_grid_detection_keeps_the_region_share_of_the_picture(tiny_world_dir):
    from dataclasses import replace

    from sae_core.intervention import ReplaceSettings

    d = erasure.DETECTION
    assert d.min_region == 3 and erasure.MIN_REGION_SIDE == 16
    assert erasure.grid_detection(d, 16) == d
    assert erasure.grid_detection(d, 8).min_region == 1  # 3/256 of the picture: 0.75 of an 8x8 patch, at least 1
    assert erasure.grid_detection(d, 32).min_region == 12
    assert erasure.grid_detection(replace(d, min_region=0), 8).min_region == 0  # off stays off
    assert erasure.grid_detection(d, 8).padding == d.padding
    world = erasure.load_world(tiny_world_dir[0], ["red"])
    world.hooks["red"] = (world.sae, "up_blocks.0.attentions.1")  # as if red were learned on the 8x8 block
    iv = erasure.intervention(world, "red", ReplaceSettings("background"))
    assert iv.detector.settings.min_region == 1


def test_note_relearned_records_the_new_concepts_in_the_summary(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "sae_summary.json").write_text(json.dumps({"fvu": 0.1, "latents_per_step": {"red": 4.0, "blue": 3.0}}))
    d = SimpleNamespace(latents=torch.tensor([[0, 1, -1], [2, -1, -1]]))  # 2 and 1 latents: 1.5 per step
    learn.note_relearned(tmp_path, {"blue": d}, learn.LearnSettings(negatives=True, concept_captions=32, max_ratio=0.15))
    got = json.loads((tmp_path / "sae_summary.json").read_text())
    assert got["fvu"] == 0.1 and got["latents_per_step"] == {"red": 4.0, "blue": 1.5}
    assert got["relearned"] == {"blue": {"negatives": True, "concept_captions": 32, "object_share": 0.0,
                                         "max_ratio": 0.15}}
    learn.note_relearned(tmp_path / "missing", {"blue": d}, learn.LearnSettings())  # no summary: nothing written
    assert not (tmp_path / "missing").exists()
