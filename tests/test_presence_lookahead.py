"""Presence gate (learning and use), look-ahead guide masks and two-pass sampling, background sources."""

import pytest
import torch
from planted import direction, orthogonal, planted_sae

from sae_core.collector import ConceptCollector
from sae_core.concept_stats import ConceptStatsAccumulator
from sae_core.concepts import ConceptDictionary
from sae_core.detect import ConceptDetector, DetectionSettings
from sae_core.gate import best_threshold, fit_gate, learn_presence_gate
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from sae_core.lookahead import GuideMasks, LookAheadSettings, guide_from_recorder, sample_twice
from sae_core.replace import patch_salience, replace_patches, source_indices
from sae_core.selection import SelectionRule, build_concept_dictionary

H, W, D = 6, 8, 16
TIMESTEPS = (900.0, 500.0, 100.0)


# -- the gate's threshold ----------------------------------------------------------------------------------


def _j(pos, neg, g):
    return sum(p >= g for p in pos) / len(pos) - sum(n >= g for n in neg) / len(neg)


def test_best_threshold_separated_sits_in_the_middle_of_the_gap():
    pos = torch.tensor([0.30, 0.25, 0.5, 0.2])
    neg = torch.tensor([0.0, 0.05, 0.1, 0.0])
    g, j = best_threshold(pos, neg)
    assert j == 1.0
    assert g == pytest.approx((0.1 + 0.2) / 2)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_reaches_the_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    pos = (torch.rand(20, generator=gen) * 0.6 + 0.1).round(decimals=2)
    neg = (torch.rand(30, generator=gen) * 0.4).round(decimals=2)
    g, j = best_threshold(pos, neg)
    grid = [i / 1000 for i in range(1, 1001)]
    best = max(_j(pos.tolist(), neg.tolist(), t) for t in grid)
    assert j == pytest.approx(best)
    assert _j(pos.tolist(), neg.tolist(), g) == pytest.approx(best)


def test_no_separation_gives_no_gate():
    g, j = best_threshold(torch.zeros(5), torch.zeros(7))
    assert g == 0.0 and j <= 0
    fit = fit_gate(torch.tensor([True, True, False, False]), torch.zeros(4, 3))
    assert fit.gate.tolist() == [0.0, 0.0, 0.0] and not fit.reliable.any()


# -- learning the gate through the collector, as Learn Concept does ----------------------------------------


def _maps(n_patches: list[int], u: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[B, D, H, W] block outputs: background orthogonal to u, u * 2.5 on the first n patches of image b."""
    g = torch.Generator().manual_seed(seed)
    bg = orthogonal(torch.randn(len(n_patches), H * W, D, generator=g), u)
    for b, n in enumerate(n_patches):
        bg[b, :n] += 2.5 * u
    return bg.view(len(n_patches), H, W, D).permute(0, 3, 1, 2).contiguous()


def _learned(u, sae):
    acc = ConceptStatsAccumulator(sae.cfg.n_latents, keep_samples=True, sample_top=sae.cfg.n_latents)
    col = ConceptCollector(sae, acc)
    for job, (label, n) in enumerate([("obj", 6), ("obj", 9), ("ctr", 1), ("ctr", 0), ("ctr", 2)]):
        col.concept, col.sample = label, job
        for t in TIMESTEPS:
            col(None, _maps([n], u, seed=job), StepInfo(t))
    d = build_concept_dictionary(acc.stats(), SelectionRule("top_n", top_n=1), keep=["obj"])
    return d, acc


def test_gate_learned_from_kept_images_separates_concept_from_contrast():
    sae, u = planted_sae(d=D)
    d, acc = _learned(u, sae)
    assert int(d.latents[0, 0, 0]) == 0  # the planted latent is the concept's
    gated = learn_presence_gate(d, acc)
    # concept images detect 6 and 9 patches, contrast 0..2: the gate is the middle of the gap (2 .. 6) / HW
    assert torch.allclose(gated.gate[0], torch.full((3,), 4.0 / (H * W)))
    assert gated.reliable.all()
    assert d.gate is None  # a copy; the input is unchanged


def test_gate_survives_save_and_load_and_old_files_load_without(tmp_path):
    from sae_core.concepts import load_concepts

    sae, u = planted_sae(d=D)
    d, acc = _learned(u, sae)
    gated = learn_presence_gate(d, acc)
    gated.save(tmp_path / "g.safetensors")
    back = load_concepts(tmp_path / "g.safetensors")
    assert torch.equal(back.gate, gated.gate) and torch.equal(back.reliable, gated.reliable)
    assert back.at(500.0).gate == pytest.approx(4.0 / (H * W))
    d.save(tmp_path / "plain.safetensors")
    plain = load_concepts(tmp_path / "plain.safetensors")
    assert plain.gate is None and plain.at(500.0).gate == 0.0 and plain.at(500.0).reliable


# -- the gate at detection time ----------------------------------------------------------------------------


def _gated_iv(u, sae, settings=None, **kw):
    d, acc = _learned(u, sae)
    det = ConceptDetector(learn_presence_gate(d, acc), settings or DetectionSettings(gate=True), sae=sae)
    return BlockIntervention(sae, det, ReplaceSettings("random", seed=3), branches="both", **kw)


def test_gate_leaves_images_without_the_concept_bit_identical():
    sae, u = planted_sae(d=D)
    iv = _gated_iv(u, sae)
    out = _maps([1, 0, 2], u, seed=11)  # false detections only
    assert iv(None, out, StepInfo(500.0)) is out
    both = _maps([7, 1], u, seed=12)
    res = iv(None, both, StepInfo(500.0))
    assert not torch.equal(res[0], both[0]) and torch.equal(res[1], both[1])


def test_ungated_detector_edits_false_detections():
    sae, u = planted_sae(d=D)
    iv = _gated_iv(u, sae, DetectionSettings(gate=False))
    out = _maps([1, 0], u, seed=11)
    res = iv(None, out, StepInfo(500.0))
    assert not torch.equal(res[0], out[0]) and torch.equal(res[1], out[1])


def test_gate_once_open_stays_open_for_the_run_and_reset_forgets():
    sae, u = planted_sae(d=D)
    iv = _gated_iv(u, sae)
    iv(None, _maps([8], u, seed=1), StepInfo(900.0))  # opens
    later = _maps([1], u, seed=2)
    assert not torch.equal(iv(None, later, StepInfo(500.0)), later)  # present: the single patch is replaced
    iv.reset()
    assert iv(None, later, StepInfo(500.0)) is later


def test_sticky_mask_keeps_patches_detected_earlier():
    sae, u = planted_sae(d=D)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), DetectionSettings(temporal="sticky"), sae=sae)
    rec = Recorder()
    iv = BlockIntervention(sae, det, None, recorder=rec)
    iv(None, _maps([5], u, seed=1), StepInfo(900.0, step_index=0))
    iv(None, _maps([2], u, seed=2), StepInfo(500.0, step_index=1))
    _, masks = rec.masks()
    assert int(masks[0].sum()) == 5 and int(masks[1].sum()) == 5  # patches 0..4 stay, 0..1 fire again


# -- look-ahead --------------------------------------------------------------------------------------------


def _record(rec, key, ts, masks, scores, branch=0):
    m = torch.stack(masks)
    rec.add("blk", StepInfo(ts, chunks=(branch,), step_index=key), branch, 0, m, torch.stack(scores),
            torch.zeros(len(masks), dtype=torch.bool))


def test_guide_from_recorder_votes_over_reliable_steps():
    sae, u = planted_sae(d=D)
    d, acc = _learned(u, sae)
    gated = learn_presence_gate(d, acc)
    gated.reliable[0, 0] = False  # the first step (t = 900) does not count
    det = ConceptDetector(gated, DetectionSettings(gate=True), sae=sae)
    rec = Recorder()
    g = float(gated.gate[0, 1])
    a, b, c = (torch.zeros(H, W, dtype=torch.bool) for _ in range(3))
    a[0, :3] = True
    b[0, 1:5] = True
    c[5, 7] = True
    big = torch.full((H, W), -1.0)
    big[0, :5] = 1.0  # 5 patches > gate
    small = torch.full((H, W), -1.0)
    small[5, 7] = 1.0  # 1 patch < gate
    _record(rec, 0, 900.0, [c, a], [small, big])  # unreliable step: ignored
    _record(rec, 1, 500.0, [a, c], [big, small])
    _record(rec, 2, 100.0, [b, c], [big, small])
    guide = guide_from_recorder(rec, det, LookAheadSettings(votes=0.5))
    assert g < 5 / (H * W) and g > 1 / (H * W)
    assert guide.present == {0: True, 1: False}
    assert torch.equal(guide.masks[0], a | b)  # each patch of a and b is on one of the two open steps: 1/2 >= 0.5
    strict = guide_from_recorder(rec, det, LookAheadSettings(votes=1.0))
    assert torch.equal(strict.masks[0], a & b)


def test_guide_without_gate_uses_every_step_and_marks_every_image_present():
    sae, u = planted_sae(d=D)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=sae)
    rec = Recorder()
    a = torch.zeros(H, W, dtype=torch.bool)
    a[2, 2] = True
    z = torch.full((H, W), -1.0)
    _record(rec, 0, 900.0, [a], [z])
    _record(rec, 1, 500.0, [a], [z])
    guide = guide_from_recorder(rec, det)
    assert guide.present == {0: True} and torch.equal(guide.masks[0], a)


def _late_object_run(iv, u):
    """Three steps; the object (8 patches) is in the map from the start but strong enough to detect only from
    step 2 on. Returns the outputs of every step."""
    outs = []
    for i, t in enumerate(TIMESTEPS):
        m = _maps([8], u, seed=5)
        if i == 0:  # weak: under the threshold
            m = _maps([0], u, seed=5) + 0.2 * (_maps([8], u, seed=5) - _maps([0], u, seed=5))
        outs.append(iv(None, m, StepInfo(t, step_index=i)))
    return outs


def test_sample_twice_edits_from_the_first_step_with_pass_one_masks():
    sae, u = planted_sae(d=D)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=sae)
    one = BlockIntervention(sae, det, ReplaceSettings("background"))
    single = _late_object_run(one, u)
    first = _maps([0], u, seed=5) + 0.2 * (_maps([8], u, seed=5) - _maps([0], u, seed=5))
    assert torch.equal(single[0], first)  # one pass: nothing detected at step 0
    la = BlockIntervention(sae, det, ReplaceSettings("background"), lookahead=LookAheadSettings())
    calls = []
    outs = sample_twice([la], lambda: calls.append(1) or _late_object_run(la, u))
    assert len(calls) == 2
    assert not torch.equal(outs[0], first)  # replaced at step 0 with the masks of steps 1-2
    changed = (outs[0] != first).any(1)[0]
    assert int(changed.sum()) == 8 and bool(changed.view(-1)[:8].all())
    assert la.phase == "single" and la.guide is None


@pytest.mark.parametrize("fail_on", [1, 2])
def test_sample_twice_restores_one_pass_mode_after_an_error(fail_on):
    sae, u = planted_sae(d=D)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=sae)
    la = BlockIntervention(sae, det, ReplaceSettings("random"), lookahead=LookAheadSettings())
    n = []

    def sample():
        n.append(1)
        _late_object_run(la, u)
        if len(n) == fail_on:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        sample_twice([la], sample)
    assert la.phase == "single" and la.guide is None and la.pass_recorder is None


def test_detect_pass_edits_nothing_and_uses_its_own_recorder():
    sae, u = planted_sae(d=D)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=sae)
    rec = Recorder()
    la = BlockIntervention(sae, det, ReplaceSettings("random"), recorder=rec, lookahead=LookAheadSettings())
    p1 = la.begin_detect_pass()
    m = _maps([8], u, seed=5)
    assert la(None, m, StepInfo(500.0, step_index=0)) is m
    assert len(p1.records) == 1 and not rec.records
    la.begin_edit_pass(GuideMasks())  # a guide that saw no image: nothing present, nothing edited
    assert la(None, m, StepInfo(500.0, step_index=0)) is m
    la.end_lookahead()


# -- background sources ------------------------------------------------------------------------------------


def test_background_sources_are_typical_undetected_finite_patches():
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(1, H, W, D, generator=g) * 0.1  # background around 0
    other = torch.zeros(H, W, dtype=torch.bool)
    other[4:6, 0:3] = True  # another object, far from the background's median
    vals[0][other] += 5.0 * direction(D, seed=7)
    vals[0, 3, 7] = float("nan")  # a non-finite patch is never a source
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 3:5, 3:5] = True
    (dst, src), = source_indices(mask, "background", values=vals)
    flat_mask, flat_other = mask.view(-1), other.view(-1)
    assert not flat_mask[src].any() and not flat_other[src].any()
    assert src.ne(3 * W + 7).all()
    out = replace_patches(vals, mask, "background").values
    assert torch.equal(out[~mask].nan_to_num(), vals[~mask].nan_to_num())  # outside the mask: untouched
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("direction", ["rows", "columns", "diagonal"])
def test_background_sources_continue_stripes_through_the_hole(direction):
    """Stripes of period 2 patches: every hole patch copies the nearest undetected patch on its own stripe."""
    g = torch.Generator().manual_seed(1)
    Hs, Ws = 9, 10
    rr, cc = torch.meshgrid(torch.arange(Hs), torch.arange(Ws), indexing="ij")
    phase = {"rows": rr, "columns": cc, "diagonal": (rr + cc) // 2}[direction] % 2  # diagonal: along (1, -1)
    a, b = direction_vec(1), direction_vec(2)
    vals = torch.where(phase[..., None].bool(), a, b) + 0.01 * torch.randn(Hs, Ws, D, generator=g)
    vals = vals[None]
    mask = torch.zeros(1, Hs, Ws, dtype=torch.bool)
    mask[0, 3:6, 4:7] = True
    (dst, src), = source_indices(mask, "background", values=vals, salience=torch.zeros(1, Hs, Ws))
    step = {"rows": (0, 1), "columns": (1, 0), "diagonal": (1, -1)}[direction]
    for d_i, s_i in zip(dst.tolist(), src.tolist(), strict=True):
        (r, c), (sr, sc) = divmod(d_i, Ws), divmod(s_i, Ws)
        assert phase[r, c] == phase[sr, sc]  # same stripe
        # on the line through the hole patch along the stripes, the nearest patch outside the hole
        line = []
        for k in range(1, 12):
            for sign in (-1, 1):
                y, x = r + sign * k * step[0], c + sign * k * step[1]
                if 0 <= y < Hs and 0 <= x < Ws and not mask[0, y, x]:
                    line.append((k, y * Ws + x))
        assert s_i == min(line)[1]
    out = replace_patches(vals, mask, "background", salience=torch.zeros(1, Hs, Ws)).values
    assert torch.equal(out[~mask], vals[~mask])


def test_patch_salience_matches_a_reference_and_salient_patches_are_never_sources():
    g = torch.Generator().manual_seed(3)
    B, k, M = 2, 3, 40
    idx = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(B * H * W)]).view(B, H, W, k)
    idx[..., 0] = 5  # latent 5 everywhere: common
    idx[0, 1:3, 1:3, 1] = 33  # latent 33 only on 4 patches of map 0: rare
    val = torch.rand(B, H, W, k, generator=g) + 0.1
    val[0, 0, 0, 2] = 0.0  # a kept zero is not active
    sal = patch_salience(val, idx, M)
    for b in range(B):
        share = {}
        for i in range(M):
            share[i] = sum(int(((idx[b] == i) & (val[b] > 0)).any(-1)[y, x]) for y in range(H) for x in range(W)) / (H * W)
        for y in range(H):
            for x in range(W):
                tot = sum(float(v) for v in val[b, y, x] if v > 0)
                rare = sum(float(v) for v, i in zip(val[b, y, x], idx[b, y, x], strict=True) if v > 0 and share[int(i)] < 0.2)
                assert float(sal[b, y, x]) == pytest.approx(rare / tot, rel=1e-5)
    vals = torch.randn(1, H, W, D, generator=g)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 4, 4:7] = True
    salience = torch.zeros(1, H, W)
    salience[0, :, :3] = 0.9  # an object on the left third
    (dst, src), = source_indices(mask, "background", values=vals, salience=salience)
    assert (src % W >= 3).all()


def direction_vec(seed):
    return direction(D, seed=seed) * 2.0


def test_gate_is_decided_on_the_cond_branch_and_uncond_rows_follow_its_mask():
    sae, u = planted_sae(d=D)
    iv = _gated_iv(u, sae)
    cond_empty, uncond_busy = _maps([0], u, seed=1), _maps([9], u, seed=2)
    batch = torch.cat([cond_empty, uncond_busy])  # [cond; uncond]: the unconditional branch alone fires
    assert iv(None, batch, StepInfo(500.0, chunks=(0, 1))) is batch
    iv.reset()
    cond_obj = _maps([7], u, seed=3)
    uncond_other = _maps([0], u, seed=4)
    uncond_other[0, :, 5, :] += 2.5 * u[:, None]  # fires on row 5 only, where cond has nothing
    batch = torch.cat([uncond_other, cond_obj])  # [uncond; cond]
    out = iv(None, batch, StepInfo(500.0, chunks=(1, 0)))
    changed_u = (out[0] != batch[0]).any(0)
    changed_c = (out[1] != batch[1]).any(0)
    assert torch.equal(changed_u, changed_c)  # both branches at the cond row's patches
    assert int(changed_c.sum()) == 7 and not changed_u[5].any()


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_gate_statistic_is_read_at_scale_one_whatever_the_detection_scale(scale):
    """The gate was learned on the share of patches above tau (scale 1): a detector at another threshold_scale
    reads the same statistic (the scale-1 path reuses the detection score, the other recomputes it)."""
    sae, u = planted_sae(d=D)
    iv = _gated_iv(u, sae, DetectionSettings(threshold_scale=scale, gate=True))
    iv(None, _maps([7, 1], u, seed=21), StepInfo(500.0))
    present = {k: bool(v) for k, v in iv._memory["present"].items()}
    assert present == {(0, 0): True, (0, 1): False}
