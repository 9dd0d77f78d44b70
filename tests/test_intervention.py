"""BlockIntervention on the planted set: CFG chunk layouts, branches, windows, chaining, recorder."""

import pytest
import torch
from einops import rearrange
from planted import planted_maps, planted_sae

from sae_core.collector import ConceptCollector
from sae_core.concept_stats import ConceptStatsAccumulator
from sae_core.concepts import ConceptDictionary
from sae_core.detect import ConceptDetector, DetectionSettings
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo, StepWindow
from sae_core.recorder import pack_mask, unpack_mask
from sae_core.steer import SteerSettings

LAYOUTS = [(0,), (1, 0), (0, 1), (0, 1, 0)]
N_IMG = 2


def make(chunks, H=5, W=7, *, residual=False, seed=0, sae_kwargs=None):
    sae, u = planted_sae(input_space="residual" if residual else "output", **(sae_kwargs or {}))
    pm = planted_maps(len(chunks) * N_IMG, H, W, u, residual=residual, seed=seed)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0, means=[0.5]), sae=sae)
    return sae, u, pm, det


def edited_rows(chunks, branches):
    flags = {"cond": (0,), "uncond": (1,), "both": (0, 1)}[branches]
    return [c * N_IMG + i for c, f in enumerate(chunks) if f in flags for i in range(N_IMG)]


def channels_last(t):
    return rearrange(t, "b c h w -> b h w c")


@pytest.mark.parametrize("chunks", LAYOUTS)
@pytest.mark.parametrize("branches", ["cond", "uncond", "both"])
@pytest.mark.parametrize("hw", [(5, 7), (6, 4)])
def test_per_on_chunk_layouts(chunks, branches, hw):
    sae, u, pm, det = make(chunks, *hw)
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings(seed=3), branches=branches, recorder=rec, label="up.1.1")
    step = StepInfo(timestep=500.0, sigma=3.0, chunks=chunks, step_index=4)
    out = iv(pm.block_in, pm.block_out, step)
    rows = edited_rows(chunks, branches)
    x, y = channels_last(pm.block_out), channels_last(out)
    for r in range(pm.block_out.shape[0]):
        if r not in rows:
            assert torch.equal(y[r], x[r])
            continue
        reg = pm.region[r]
        assert torch.equal(y[r][~reg], x[r][~reg])  # outside: bit-identical
        assert (y[r][reg] @ u).abs().max() < 1e-5  # inside: no planted component left
        pool = x[r][~reg]
        for v in y[r][reg]:
            assert (pool == v).all(-1).any()  # copied from a non-detected patch of the same map
    # the recorder holds exactly the planted masks, per branch, chunk and image
    assert len(rec.records) == len(rows)
    for rc in rec.records:
        row = rc.chunk * N_IMG + rc.image
        assert row in rows and rc.branch == ("cond" if chunks[rc.chunk] == 0 else "uncond")
        assert torch.equal(rc.mask(), pm.region[row]) and rc.key == 4 and rc.hw == hw
        assert rc.score.dtype == torch.float16 and rc.score.shape == hw


def test_cond_draw_does_not_depend_on_the_layout():
    # the same cond map at the same step gets the same replacement whether uncond ran before, after or not at all
    sae, u, pm, det = make((0,))
    iv = BlockIntervention(sae, det, ReplaceSettings(seed=11))
    step = dict(timestep=700.0, step_index=2)
    alone = iv(None, pm.block_out, StepInfo(chunks=(0,), **step))
    noise = torch.randn_like(pm.block_out)
    for chunks, order in (((1, 0), (noise, pm.block_out)), ((0, 1), (pm.block_out, noise))):
        out = iv(None, torch.cat(order), StepInfo(chunks=chunks, **step))
        cond = out[N_IMG:] if chunks == (1, 0) else out[:N_IMG]
        assert torch.equal(cond, alone)


def test_replace_residual_target_with_a_residual_sae():
    sae, u, pm, det = make((1, 0), residual=True)
    iv = BlockIntervention(sae, det, ReplaceSettings("random", seed=1, target="residual"), branches="both")
    out = iv(pm.block_in, pm.block_out, StepInfo(100.0, chunks=(1, 0), step_index=0))
    r_in = channels_last(pm.block_out - pm.block_in)
    xi, xo, y = channels_last(pm.block_in), channels_last(pm.block_out), channels_last(out)
    for b in range(out.shape[0]):
        reg = pm.region[b]
        assert torch.equal(y[b][~reg], xo[b][~reg])
        new_res = y[b][reg] - xi[b][reg]  # out' - in on detected patches = some undetected residual
        pool = r_in[b][~reg]
        for v in new_res:
            assert torch.isclose(pool, v, atol=1e-5, rtol=0).all(-1).any()
        # the block input of a detected patch is kept: only the residual was replaced
        assert (new_res @ u).abs().max() < 1e-4


def test_replace_output_target_with_a_residual_sae_copies_whole_outputs():
    sae, u, pm, det = make((0,), residual=True)
    iv = BlockIntervention(sae, det, ReplaceSettings("nearest", target="output"))
    out = iv(pm.block_in, pm.block_out, StepInfo(100.0))
    xo, y = channels_last(pm.block_out), channels_last(out)
    for b in range(out.shape[0]):
        pool = xo[b][~pm.region[b]]
        for v in y[b][pm.region[b]]:
            assert (pool == v).all(-1).any()


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("chunks", [(1, 0), (0, 1, 0)])
def test_steer_preserve_leaves_undetected_bit_identical(residual, chunks):
    sae, u, pm, det = make(chunks, 6, 4, residual=residual)
    iv = BlockIntervention(sae, det, SteerSettings("saeuron_scale", -10.0), branches="both")
    out = iv(pm.block_in, pm.block_out, StepInfo(10.0, chunks=chunks))
    x, y = channels_last(pm.block_out), channels_last(out)
    assert torch.equal(y[~pm.region], x[~pm.region])
    a = channels_last(pm.block_out - pm.block_in) if residual else x
    ya = channels_last(out - pm.block_in) if residual else y
    # latent 0 was a (2..3); now -10 * 0.5 * a along u
    torch.testing.assert_close(ya[pm.region] @ u, -5.0 * (a[pm.region] @ u), rtol=1e-4, atol=1e-4)


def test_window_and_branch_selection():
    sae, u, pm, det = make((1, 0))
    iv = BlockIntervention(sae, det, ReplaceSettings(), window=StepWindow(timestep_min=200, timestep_max=800))
    assert iv(None, pm.block_out, StepInfo(900.0, chunks=(1, 0))) is pm.block_out
    assert iv(None, pm.block_out, StepInfo(100.0, chunks=(1, 0))) is pm.block_out
    assert iv(None, pm.block_out, StepInfo(500.0, chunks=(1, 0))) is not pm.block_out
    sig = BlockIntervention(sae, det, ReplaceSettings(), window=StepWindow(sigma_min=1.0, sigma_max=5.0))
    assert sig(None, pm.block_out, StepInfo(500.0, sigma=7.0, chunks=(1, 0))) is pm.block_out
    assert sig(None, pm.block_out, StepInfo(500.0, sigma=2.0, chunks=(1, 0))) is not pm.block_out
    with pytest.raises(ValueError, match="sigma bounds but the StepInfo has no sigma"):
        sig(None, pm.block_out, StepInfo(500.0, chunks=(1, 0)))
    only_uncond = BlockIntervention(sae, det, ReplaceSettings(), branches="uncond")
    cond_only = pm.block_out[:N_IMG]
    assert only_uncond(None, cond_only, StepInfo(1.0, chunks=(0,))) is cond_only  # cfg 1: no uncond pass


def test_chaining_detect_then_replace_then_steer():
    sae, u, pm, det = make((1, 0))
    rec = Recorder()
    look = BlockIntervention(sae, det, None, recorder=rec, label="look")
    per = BlockIntervention(sae, det, ReplaceSettings(seed=2), recorder=rec, label="per")
    after = BlockIntervention(sae, det, SteerSettings("saeuron_scale", -10.0), recorder=rec, label="after")
    step = StepInfo(400.0, chunks=(1, 0), step_index=1)
    y0 = look(None, pm.block_out, step)
    assert y0 is pm.block_out  # detection only: the very same tensor
    y1 = per(None, y0, step)
    y2 = after(None, y1, step)
    assert y2 is y1  # PER removed the concept, so the steer after it finds nothing to change
    _, m_look = rec.masks("cond", 1, label="look")
    _, m_after = rec.masks("cond", 1, label="after")
    assert torch.equal(m_look[0], pm.region[N_IMG + 1]) and not m_after.any()
    assert rec.labels() == ["after", "look", "per"]


def fully_detected(rec: Recorder) -> list:
    """The records whose map was fully detected (so PER left it unchanged), read from the recorded data;
    the flag each record carries must agree with its mask."""
    for r in rec.records:
        assert r.all_detected == bool(r.mask().all()), (r.branch, r.image)
    return [r for r in rec.records if r.all_detected]


def test_all_detected_is_unchanged_and_recorded():
    sae, u, pm0, det = make((0, 1), residual=True)
    region = pm0.region.clone()
    region[1] = True  # cond image 1 is the concept everywhere
    pm = planted_maps(2 * N_IMG, 5, 7, u, residual=True, region=region)
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings(target="residual"), recorder=rec)
    out = iv(pm.block_in, pm.block_out, StepInfo(300.0, chunks=(0, 1), step_index=0))
    assert torch.equal(out[1], pm.block_out[1])
    assert not torch.equal(out[0], pm.block_out[0])
    flagged = fully_detected(rec)
    assert [(r.branch, r.image) for r in flagged] == [("cond", 1)]
    rec.reset()
    for edit in (None, SteerSettings("saeuron_scale", -1.0)):  # detection-only and steering record it too
        BlockIntervention(sae, det, edit, recorder=rec)(pm.block_in, pm.block_out, StepInfo(300.0, chunks=(0, 1)))
    assert [(r.branch, r.image) for r in fully_detected(rec)] == [("cond", 1), ("cond", 1)]


def test_recorder_stacks_aggregates_and_resets():
    sae, u, pm, det = make((1, 0), 3, 5)
    rec = Recorder(record_scores=False)
    iv = BlockIntervention(sae, det, None, recorder=rec)
    for i, t in enumerate((900.0, 500.0, 100.0)):
        iv(None, pm.block_out, StepInfo(t, chunks=(1, 0), step_index=i))
    keys, masks = rec.masks("uncond", 0)
    assert keys == [0, 1, 2] and masks.shape == (3, 3, 5)
    assert all(torch.equal(m, pm.region[0]) for m in masks)
    torch.testing.assert_close(rec.aggregate("cond", 1), pm.region[N_IMG + 1].float())
    assert rec.records[0].score is None
    rec.reset()
    with pytest.raises(KeyError, match="nothing recorded for branch='cond'"):
        rec.masks("cond", 0)


def test_recorder_keys_by_timestep_without_step_index():
    sae, u, pm, det = make((0,))
    rec = Recorder()
    BlockIntervention(sae, det, None, recorder=rec)(None, pm.block_out, StepInfo(321.5))
    assert rec.keys() == [321.5]


@pytest.mark.parametrize("hw", [(3, 5), (1, 1), (8, 8), (7, 9)])
def test_pack_unpack_round_trip(hw):
    m = torch.rand(4, *hw) > 0.5
    bits = pack_mask(m)
    assert bits.dtype == torch.uint8 and bits.shape == (4, (hw[0] * hw[1] + 7) // 8)
    assert torch.equal(unpack_mask(bits, hw), m)


def test_bad_inputs():
    sae, u, pm, det = make((1, 0))
    iv = BlockIntervention(sae, det, ReplaceSettings(), label="up.1.1")
    with pytest.raises(ValueError, match=r"batch of 4 rows does not split into 3 equal CFG chunks"):
        iv(None, pm.block_out, StepInfo(1.0, chunks=(0, 1, 0)))
    with pytest.raises(ValueError, match=r"up.1.1.*shape \(4, 8, 5, 7\), expected \[B, 16, H, W\] for SAE planted-sae"):
        iv(None, pm.block_out[:, :8], StepInfo(1.0, chunks=(1, 0)))
    res = BlockIntervention(sae, det, ReplaceSettings(target="residual"), label="r")
    with pytest.raises(ValueError, match=r"needs the block input.*got None"):
        res(None, pm.block_out, StepInfo(1.0, chunks=(1, 0)))
    with pytest.raises(ValueError, match="branches is 'all'"):
        BlockIntervention(sae, det, branches="all")
    with pytest.raises(TypeError, match="edit is dict"):
        BlockIntervention(sae, det, {"mode": "random"})
    with pytest.raises(ValueError, match="input_space is 'delta'"):
        BlockIntervention(sae, det, input_space="delta")
    other = ConceptDetector(ConceptDictionary.from_latents([0], 99))
    with pytest.raises(ValueError, match="concepts have 99 latents, the SAE planted-sae has 24"):
        BlockIntervention(sae, other)
    with pytest.raises(ValueError, match=r"chunks is \(0, 2\)"):
        StepInfo(1.0, chunks=(0, 2))
    with pytest.raises(ValueError, match="target is 'input'"):
        ReplaceSettings(target="input")
    with pytest.raises(ValueError, match="replacement mode is 'swap'"):
        ReplaceSettings(mode="swap")


def test_padding_through_the_intervention_and_fp16():
    sae, u, pm, det = make((1, 0), 6, 5)
    det.settings = DetectionSettings(padding=1)
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings("mean"), recorder=rec)
    out = iv(None, pm.block_out.half(), StepInfo(1.0, chunks=(1, 0)))
    assert out.dtype == torch.float16
    grown = torch.nn.functional.max_pool2d(pm.region.float()[:, None], 3, 1, 1)[:, 0] > 0
    for rc in rec.records:
        assert torch.equal(rc.mask(), grown[rc.chunk * N_IMG + rc.image])


def test_per_on_a_clean_map_returns_the_same_tensor():
    sae, u, pm, det = make((1, 0))
    clean = planted_maps(2 * N_IMG, 5, 7, u, region=torch.zeros(2 * N_IMG, 5, 7, dtype=torch.bool)).block_out
    rec = Recorder()
    out = BlockIntervention(sae, det, ReplaceSettings(), recorder=rec)(None, clean, StepInfo(1.0, chunks=(1, 0)))
    assert out is clean and len(rec.records) == 2 * N_IMG and not fully_detected(rec)


@pytest.mark.parametrize("chunks", [(1, 0), (0, 1, 0), (0,)])
@pytest.mark.parametrize("residual", [False, True])
def test_concept_collector_feeds_cond_rows_only(chunks, residual):
    sae, u, pm, det = make(chunks, 4, 6, residual=residual)
    acc = ConceptStatsAccumulator(sae.cfg.n_latents)
    col = ConceptCollector(sae, acc)
    with pytest.raises(RuntimeError, match="set .concept"):
        col(pm.block_in, pm.block_out, StepInfo(999.0, chunks=chunks))
    for name in ("cat", "other"):
        col.concept = name
        for t in (999.0, 1.0):
            assert col(pm.block_in, pm.block_out, StepInfo(t, chunks=chunks)) is pm.block_out
    assert col.needs_block_in is residual  # hosts copy the block input (DiT blocks change it in place) only then
    a = pm.block_out - pm.block_in if residual else pm.block_out
    rows = edited_rows(chunks, "cond")
    ref = sae.encode(channels_last(a[rows])).reshape(-1, sae.cfg.n_latents).double().mean(0)
    stats = acc.stats()
    torch.testing.assert_close(stats.means[0, 0], ref)
    assert stats.counts[0, 0] == len(rows) * 4 * 6


def test_concept_collector_rejects_mismatches():
    sae, u, pm, det = make((0,))
    with pytest.raises(ValueError, match="accumulator has 7 latents"):
        ConceptCollector(sae, ConceptStatsAccumulator(7))
    col = ConceptCollector(sae, ConceptStatsAccumulator(sae.cfg.n_latents))
    col.concept = "x"
    with pytest.raises(ValueError, match=r"expected \[B, 16, H, W\]"):
        col(None, pm.block_out[:, :4], StepInfo(1.0))


def test_deepcopy_shares_weights_and_records():
    import copy

    sae, u, pm, det = make((0,))
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings(), recorder=rec)
    col = ConceptCollector(sae, ConceptStatsAccumulator(sae.cfg.n_latents))
    options = {"patches": [iv, col], "rec": rec}
    cloned = copy.deepcopy(options)
    assert cloned["patches"][0] is iv and cloned["patches"][1] is col and cloned["rec"] is rec
