"""The denoised-prediction fill (sae_core.denoised): sources, the two passes, model-output conversions, the
scheduler patch, and the settings' checks."""

from dataclasses import replace

import pytest
import torch
from planted import planted_sae

from sae_core.concepts import ConceptDictionary
from sae_core.denoised import DenoisedFill, cell_sources, erode_cells, fill_masks, object_pixels
from sae_core.detect import ConceptDetector
from sae_core.errors import SAEInputError
from sae_core.intervention import BlockIntervention, ReplaceSettings
from sae_core.lookahead import GuideMasks, LookAheadSettings


def _scene(stripes: str | None, obj: bool, S: int = 16) -> torch.Tensor:
    """[3, S, S]: a grey background (plain, or stripes of period 4 px: rows, columns or diagonals), and with
    ``obj`` a red square on pixels 4..7 x 4..7 (cells (2, 2) .. (3, 3) of an 8x8 grid)."""
    img = torch.full((3, S, S), 0.5)
    y, x = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    if stripes is not None:
        phase = ({"rows": y, "cols": x, "diag": x + y}[stripes] // 2) % 2 == 0
        img[:, phase] = 0.9
    if obj:
        img[:, 4:8, 4:8] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return img


HOLE = torch.zeros(8, 8, dtype=torch.bool)
HOLE[2:4, 2:4] = True


@pytest.mark.parametrize("stripes", [None, "rows", "cols", "diag"])
def test_cell_sources_fill_the_hole_with_the_background_the_object_hid(stripes):
    # cells of 2x2 px, stripes of 4 px: only a copy along the stripe continues it (the nearest cell across does not)
    final = _scene(stripes, obj=True)
    idx = cell_sources(final, HOLE)
    filled = final.flatten(1)[:, idx].view_as(final)
    torch.testing.assert_close(filled, _scene(stripes, obj=False), rtol=0, atol=0)


def test_cell_sources_never_copy_masked_or_non_finite_cells():
    final = _scene(None, obj=True)
    final[:, 0:2, :] = float("nan")  # the top row of cells is non-finite
    idx = cell_sources(final, HOLE).view(16, 16)
    src_cells = {(int(i) // 16 // 2, int(i) % 16 // 2) for i in idx[4:8, 4:8].flatten()}
    assert all(not HOLE[c] and c[0] != 0 for c in src_cells)
    # every pixel outside the hole maps to itself
    ident = torch.arange(256).view(16, 16)
    outside = ~HOLE.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(idx[outside], ident[outside])


def test_cell_sources_nothing_to_do_or_nothing_to_copy_from():
    final = _scene(None, obj=False)
    assert cell_sources(final, torch.zeros(8, 8, dtype=torch.bool)) is None
    assert cell_sources(final, torch.ones(8, 8, dtype=torch.bool)) is None


def test_cell_sources_on_sizes_that_do_not_divide_keep_cell_offsets():
    # a 15x15 picture under an 8x8 grid: pixels map to cells by floor(y * 8 / 15); each copy is a shift by whole cells
    final = torch.rand(2, 15, 15, generator=torch.Generator().manual_seed(0))
    idx = cell_sources(final, HOLE).view(15, 15)
    ys, xs = torch.meshgrid(torch.arange(15), torch.arange(15), indexing="ij")
    hole_px = HOLE[(ys * 8) // 15, (xs * 8) // 15]
    sy, sx = idx // 15, idx % 15
    assert not HOLE[(sy * 8) // 15, (sx * 8) // 15][hole_px].any()
    assert torch.equal(idx[~hole_px], (ys * 15 + xs)[~hole_px])


LOOK_AHEAD = LookAheadSettings()


def _iv(lookahead=LOOK_AHEAD, denoised=True, fill_values="first_pass", keep_rest="off", hole="cells"):
    """hole "cells" by default: these tests pin the fill of whole cells; the object's pixels have their own tests."""
    sae, _ = planted_sae(d=8)
    concept = ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0, means=[0.5])
    det = ConceptDetector(concept, sae=sae)
    return BlockIntervention(sae, det, ReplaceSettings("background", denoised=denoised, fill_values=fill_values,
                                                             keep_rest=keep_rest, hole=hole),
                             lookahead=lookahead)


def _guide(masks: dict, present: dict) -> GuideMasks:
    return GuideMasks(masks=masks, present=present)


def _hole_pixels(mask: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[H, W] bool: the pixels whose cell (floor(y * h / H), floor(x * w / W)) is in ``mask`` [h, w]."""
    h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return mask[(ys * h) // H, (xs * w) // W]


def _pinned(final: torch.Tensor, now: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The default fill of one image, written out: inside the cells to fill, pass 1's picture ``final`` [C, H, W] at
    the sources ``idx``; everywhere else pass 2's prediction ``now`` as it is."""
    C, H, W = now.shape
    hole = _hole_pixels(mask, H, W)
    want = now.clone()
    want[:, hole] = final.flatten(1)[:, idx].view(C, H, W)[:, hole].to(now.dtype)
    return want


def test_fill_keeps_pass_one_and_fills_only_present_images_in_pass_two():
    iv = _iv()
    fill = DenoisedFill([iv])
    assert fill
    final = torch.stack([_scene("rows", True), _scene(None, True)])
    iv.phase = "detect"
    assert fill(final) is final  # pass 1 is never changed
    iv.phase, iv.guide = "edit", _guide({0: HOLE, 1: HOLE}, {0: True, 1: False})
    now = final + 0.01  # pass 2's prediction differs from pass 1's picture; sources come from pass 1
    out = fill(now)
    torch.testing.assert_close(out[1], now[1], rtol=0, atol=0)  # not present: untouched
    idx = cell_sources(final[0], HOLE)
    torch.testing.assert_close(out[0], _pinned(final[0], now[0], HOLE, idx), rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 4:8, 4:8], _scene("rows", False)[:, 4:8, 4:8], rtol=0, atol=0)  # pass 1's
    iv.end_lookahead()
    assert iv.fill_memory == {} and fill(now) is now


def test_fill_is_off_without_look_ahead_or_the_option():
    assert not DenoisedFill([_iv(denoised=False)])
    with pytest.raises(SAEInputError, match="lookahead is None"):
        _iv(lookahead=None)
    with pytest.raises(SAEInputError, match="denoised"):
        ReplaceSettings("background", denoised="yes")
    assert ReplaceSettings.from_dict({"mode": "mean"}).denoised is False  # settings saved before keep loading


def test_fill_values_are_checked_and_default_to_the_first_pass():
    assert ReplaceSettings().fill_values == "first_pass"
    old = {"mode": "background", "seed": 0, "target": "output", "denoised": True}  # saved before fill_values
    assert ReplaceSettings.from_dict(old).fill_values == "first_pass"
    cur = ReplaceSettings("background", denoised=True, fill_values="current")
    assert ReplaceSettings.from_dict(cur.to_dict()) == cur
    for bad in ("pass1", "", None, 1):
        with pytest.raises(SAEInputError, match=r"ReplaceSettings.fill_values is .*, expected one of "
                                                r"\['first_pass', 'current'\]"):
            ReplaceSettings("background", denoised=True, fill_values=bad)


def test_current_fill_values_copy_pass_twos_prediction_and_draw_its_bar():
    """Pass 2 draws the object onto the hole's source cells: "current" copies it into the hole (the bar the default
    avoids), "first_pass" shows pass 1's background there; outside the hole both leave pass 2's prediction alone."""
    final = _scene("rows", True)[None]
    idx = cell_sources(final[0], HOLE)
    now = final + 0.01
    src = torch.zeros(256, dtype=torch.bool)
    src[idx.view(16, 16)[4:8, 4:8].flatten()] = True
    src = src.view(16, 16)
    assert not src[4:8, 4:8].any()
    now[0][:, src] = torch.tensor([1.0, 0.0, 0.0])[:, None]  # pass 2 draws the red object on the sources
    outs = {}
    for how in ("current", "first_pass"):
        iv = _iv(fill_values=how)
        fill = DenoisedFill([iv])
        iv.phase = "detect"
        fill(final)
        iv.phase, iv.guide = "edit", _guide({0: HOLE}, {0: True})
        outs[how] = fill(now)
    torch.testing.assert_close(outs["current"][0], now[0].flatten(1)[:, idx].view_as(now[0]), rtol=0, atol=0)
    assert torch.equal(outs["current"][0, :, 4:8, 4:8], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 4, 4))
    torch.testing.assert_close(outs["first_pass"][0], _pinned(final[0], now[0], HOLE, idx), rtol=0, atol=0)
    torch.testing.assert_close(outs["first_pass"][0, :, 4:8, 4:8], _scene("rows", False)[:, 4:8, 4:8], rtol=0, atol=0)
    outside = ~_hole_pixels(HOLE, 16, 16)
    for out in outs.values():
        assert torch.equal(out[0][:, outside], now[0][:, outside])


def test_first_pass_values_take_pass_twos_dtype():
    iv = _iv()
    fill = DenoisedFill([iv])
    final = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    iv.phase = "detect"
    fill(final)
    iv.phase, iv.guide = "edit", _guide({0: HOLE}, {0: True})
    now = (final + 0.25).to(torch.bfloat16)
    out = fill(now)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], _pinned(final[0], now[0], HOLE, cell_sources(final[0], HOLE)), rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
def test_fill_model_output_converts_through_the_denoised_prediction(prediction):
    iv = _iv()
    fill = DenoisedFill([iv])
    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([_scene("cols", True), _scene(None, True)])
    eps = torch.randn(x0.shape, generator=g)
    a = torch.tensor(0.3)
    sigma = torch.tensor(0.6)  # flow: x_t = (1 - sigma) x0 + sigma eps, output eps - x0
    x = (1 - sigma) * x0 + sigma * eps if prediction == "flow" else a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0,
           "flow": eps - x0}[prediction]
    iv.phase = "detect"
    assert fill.fill_model_output(out, x, a, prediction, sigma=sigma) is out
    iv.phase, iv.guide = "edit", _guide({0: HOLE}, {0: True})
    new = fill.fill_model_output(out, x, a, prediction, sigma=sigma)
    torch.testing.assert_close(new[1], out[1], rtol=0, atol=0)  # image 1: no guide mask, bit-identical
    # the prediction the new output implies: image 0's hole shows the background the object hid
    if prediction == "epsilon":
        x0_new = (x - (1 - a).sqrt() * new) / a.sqrt()
    elif prediction == "v_prediction":
        x0_new = a.sqrt() * x - (1 - a).sqrt() * new
    elif prediction == "flow":
        x0_new = x - sigma * new
    else:
        x0_new = new
    torch.testing.assert_close(x0_new[0], _scene("cols", False), rtol=0, atol=1e-5)
    with pytest.raises(SAEInputError, match="prediction_type"):
        fill.fill_model_output(out, x, a, "x0")
    with pytest.raises(SAEInputError, match="needs sigma"):
        fill.fill_model_output(out, x, a, "flow")


class _Sched:
    def __init__(self):
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)
        self.seen = []

    def step(self, model_output, timestep, sample, **kw):
        self.seen.append(model_output)
        if kw.get("boom"):
            raise RuntimeError("boom")
        return model_output


def test_patch_scheduler_fills_and_restores_the_step_also_after_an_error():
    iv = _iv()
    fill = DenoisedFill([iv])
    sched = _Sched()
    x0 = _scene(None, True)[None]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    a = sched.alphas_cumprod[500]
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    iv.phase, iv.guide = "edit", _guide({0: HOLE}, {0: True})
    iv.fill_memory["final"] = x0.clone()
    with pytest.raises(RuntimeError):
        with fill.patch_scheduler(sched):
            sched.step(eps, 500, x)
            sched.step(eps, 500, x, boom=True)
    assert "step" not in vars(sched)  # the class's own step again
    x0_new = (x - (1 - a).sqrt() * sched.seen[0]) / a.sqrt()
    torch.testing.assert_close(x0_new[0], _scene(None, False), rtol=0, atol=1e-5)

    class NoAlphas:
        def step(self, *a, **k):
            return None

    with pytest.raises(SAEInputError, match="neither alphas_cumprod nor flow-matching"):
        with fill.patch_scheduler(NoAlphas()):
            pass


def test_cell_sources_skip_salient_cells_unless_every_candidate_is():
    final = _scene(None, obj=True)
    final[:, 4:8, 8:16] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # a blue bar right of the hole: cells (2..3, 4..7)
    sal = torch.zeros(8, 8)
    sal[2:4, 4:8] = 0.9  # the block calls the bar's patches an object
    idx = cell_sources(final, HOLE, sal)
    filled = final.flatten(1)[:, idx].view_as(final)
    assert torch.equal(filled[:, 4:8, 4:8], torch.full((3, 4, 4), 0.5))  # grey, never the bar
    everything = torch.ones(8, 8)  # every candidate salient: fall back to every unmasked cell
    assert cell_sources(final, HOLE, everything) is not None


def test_detect_pass_keeps_the_cond_rows_salience_for_the_fill():
    from sae_core.intervention import KEPT_DENSE, StepInfo
    from sae_core.replace import patch_salience

    iv = _iv()
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 8, 6, 8, generator=g)  # [cond; uncond] rows of one image
    iv.begin_detect_pass()
    iv(None, maps * 3, StepInfo(900.0, step_index=0, chunks=(0, 1)))
    iv(None, maps, StepInfo(500.0, step_index=1, chunks=(0, 1)))  # the last step of pass 1 is the one kept
    sal = iv.fill_salience()
    assert set(sal) == {0}
    codes = iv.sae.encode(maps[:1].movedim(1, -1))
    top = codes.topk(min(codes.shape[-1], KEPT_DENSE), dim=-1)
    want = patch_salience(top.values, top.indices, codes.shape[-1])[0]
    torch.testing.assert_close(sal[0], want)
    assert iv.fill_salience() is sal  # computed once
    iv.begin_edit_pass(GuideMasks())
    iv(None, maps * 2, StepInfo(400.0, step_index=2, chunks=(0, 1)))
    assert torch.equal(iv.fill_salience()[0], want)  # pass 2 reads pass 1's, never overwrites it
    iv.end_lookahead()
    assert iv.fill_memory == {}
    assert not DenoisedFill([_iv(denoised=False)])



@pytest.mark.parametrize("seed", range(12))
def test_cell_sources_on_random_sizes_never_copy_from_the_hole(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = (int(v) for v in torch.randint(4, 41, (2,), generator=g))
    h, w = (int(v) for v in torch.randint(2, 17, (2,), generator=g))
    h, w = min(h, H), min(w, W)  # a block's grid is never finer than the prediction (see the next test)
    final = torch.rand(3, H, W, generator=g)
    mask = torch.rand(h, w, generator=g) < 0.4
    idx = cell_sources(final, mask)
    if not mask.any() or mask.all():
        assert idx is None
        return
    idx = idx.view(H, W)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    cy, cx = torch.clamp((ys * h) // H, max=h - 1), torch.clamp((xs * w) // W, max=w - 1)
    hole = mask[cy, cx]
    assert torch.equal(idx[~hole], (ys * W + xs)[~hole])
    sy, sx = idx // W, idx % W
    src_cells = mask[torch.clamp((sy * h) // H, max=h - 1), torch.clamp((sx * w) // W, max=w - 1)]
    assert not src_cells[hole].any()


def test_cell_sources_on_a_grid_finer_than_the_prediction_pool_the_mask():
    final = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[0:3, 0:3] = True  # pixels (0..1, 0..1) of the 6x6 prediction
    idx = cell_sources(final, mask).view(6, 6)
    hole = torch.zeros(6, 6, dtype=torch.bool)
    hole[0:2, 0:2] = True
    assert torch.equal(idx[~hole], torch.arange(36).view(6, 6)[~hole])
    assert not hole.flatten()[idx[hole]].any()


def test_packed_tokens_are_filled_as_the_guide_grid():
    """diffusers' FLUX latents: [B, N, D] tokens, one per cell of the guide's grid (here 8x8 cells of 12 values)."""
    iv = _iv()
    fill = DenoisedFill([iv])
    grid = torch.rand(2, 12, 8, 8, generator=torch.Generator().manual_seed(4))
    tokens = grid.flatten(2).transpose(1, 2)  # [2, 64, 12]
    iv.phase = "detect"
    fill(tokens)
    iv.phase, iv.guide = "edit", _guide({0: HOLE, 1: HOLE}, {0: True, 1: True})
    now = tokens + 0.5
    out = fill(now)
    grid_now = now.transpose(1, 2).reshape(2, 12, 8, 8)
    for b in range(2):
        idx = cell_sources(grid[b], HOLE)
        want = _pinned(grid[b], grid_now[b], HOLE, idx).flatten(1)  # one token per cell: [12, 64]
        torch.testing.assert_close(out[b].transpose(0, 1), want, rtol=0, atol=0)
        assert torch.equal(out[b][~HOLE.flatten()], now[b][~HOLE.flatten()])
    torch.testing.assert_close(fill(now[:, :63]), now[:, :63], rtol=0, atol=0)  # another token count: left alone


def test_patch_scheduler_on_diffusers_flow_matching_euler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    iv = _iv()
    fill = DenoisedFill([iv])
    x0 = _scene("rows", True)[None]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = sched.timesteps[1]
    sigma = sched.sigmas[1]
    x = (1 - sigma) * x0 + sigma * eps
    iv.phase, iv.guide = "edit", _guide({0: HOLE}, {0: True})
    iv.fill_memory["final"] = x0.clone()
    sched._step_index = 1  # as after one step of a pipeline
    with fill.patch_scheduler(sched):
        prev = sched.step(eps - x0, t, x).prev_sample
    assert "step" not in vars(sched)
    # Euler: prev = x + (sigma_next - sigma) * v, with v the velocity whose x0 is the filled picture
    v_new = (x - _scene("rows", False)[None]) / sigma
    want = x + (sched.sigmas[2] - sigma) * v_new
    torch.testing.assert_close(prev, want, rtol=0, atol=1e-5)


def test_fill_masks_add_edited_cells_except_other_objects():
    guide = HOLE.clone()
    edited = HOLE.clone()
    edited[2:4, 5:7] = True  # the live detector's find beside the hole
    edited[5:7, 2:4] = True  # ... and on a cell where pass 1 drew another object
    sal = torch.zeros(8, 8)
    sal[5:7, 2:4] = 0.9
    sal[2:4, 2:4] = 0.9  # the guide's own cells are salient too (the target): filled all the same
    want = HOLE.clone()
    want[2:4, 5:7] = True
    assert torch.equal(fill_masks(guide, edited, sal), want)
    assert torch.equal(fill_masks(guide, None, sal), guide)
    assert torch.equal(fill_masks(guide, edited, None), HOLE | edited)


def test_pass_two_fills_the_live_detectors_cells_from_the_step_they_are_edited():
    from sae_core.intervention import StepInfo
    from sae_core.synthetic import direction, planted_maps

    iv = _iv()
    fill = DenoisedFill([iv])
    u = direction(8)
    final = _scene(None, obj=True)[None]
    final[0, :, 10:14, 4:8] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # another object: cells (5..6, 2..3)
    found = torch.zeros(1, 8, 8, dtype=torch.bool)
    found[0, 2:4, 2:4] = True
    iv.begin_detect_pass()
    rows = planted_maps(1, 8, 8, u, region=found).block_out
    iv(None, torch.cat([rows, rows]), StepInfo(500.0, step_index=0, chunks=(0, 1)))
    assert fill(final) is final
    sal = torch.zeros(8, 8)
    sal[5:7, 2:4] = 0.9  # pass 1 drew another object there
    iv.fill_memory["salience"] = {0: sal}
    iv.begin_edit_pass(_guide({0: HOLE}, {0: True}))
    now = final + 0.01
    now[0, :, 4:8, 10:14] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # pass 2 redraws the object beside the hole
    iv(None, torch.cat([rows, rows]), StepInfo(900.0, step_index=0, chunks=(0, 1)))  # the guide's cells only
    first = fill(now)
    torch.testing.assert_close(first[0], _pinned(final[0], now[0], HOLE, cell_sources(final[0], HOLE, sal)),
                               rtol=0, atol=0)
    kept = iv.fill_memory["sources"]
    assert kept[1] is not None
    iv(None, torch.cat([rows, rows]), StepInfo(800.0, step_index=1, chunks=(0, 1)))  # nothing new: same sources
    fill(now)
    assert iv.fill_memory["sources"] is kept
    region = found.clone()
    region[0, 2:4, 5:7] = True  # the model redraws the object beside the hole: the live detector edits it
    region[0, 5:7, 2:4] = True  # and the colour migrates onto the other object
    more = planted_maps(1, 8, 8, u, region=region).block_out
    iv(None, torch.cat([more, more]), StepInfo(700.0, step_index=2, chunks=(0, 1)))
    want = HOLE.clone()
    want[2:4, 5:7] = True
    out = fill(now)
    torch.testing.assert_close(out[0], _pinned(final[0], now[0], want, cell_sources(final[0], want, sal)),
                               rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 4:8, 10:14], final[0, :, 0:4, 0:4], rtol=0, atol=0)  # pass 1's background
    torch.testing.assert_close(out[0, :, 10:14, 4:8], now[0, :, 10:14, 4:8], rtol=0, atol=0)  # the other object
    iv(None, torch.cat([rows, rows]), StepInfo(600.0, step_index=3, chunks=(0, 1)))  # sticky: still filled
    torch.testing.assert_close(fill(now), out, rtol=0, atol=0)
    iv.end_lookahead()
    assert iv.fill_memory == {}


def test_keep_rest_is_checked_and_defaults_to_all():
    assert ReplaceSettings().keep_rest == "all"
    old = {"mode": "background", "seed": 0, "target": "output", "denoised": True, "fill_values": "first_pass"}
    assert ReplaceSettings.from_dict(old).keep_rest == "all"  # saved before keep_rest: today's default
    for bad in ("outside", "", None, 1):
        with pytest.raises(SAEInputError, match=r"ReplaceSettings.keep_rest is .*, expected one of "
                                                r"\['all', 'objects', 'off'\]"):
            ReplaceSettings("background", denoised=True, keep_rest=bad)


def _two_passes(iv, fill, pass1: list, pass2: list, guide, salience=None) -> list:
    """Pass 1 sees the predictions ``pass1`` (one per call), pass 2 gets ``pass2`` filled; returns pass 2's outputs."""
    iv.begin_detect_pass()
    for d in pass1:
        assert fill(d) is d
    if salience is not None:
        iv.fill_memory["salience"] = salience
    iv.begin_edit_pass(guide)
    return [fill(d) for d in pass2]


def test_keep_rest_all_keeps_pass_ones_prediction_of_the_same_call_outside_the_hole():
    """Outside the cells to fill, call k of pass 2 gets call k of pass 1 exactly (the unedited sampling's
    prediction), inside them the fill; an image without the concept keeps pass 2's own prediction."""
    g = torch.Generator().manual_seed(3)
    pass1 = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(3)]
    pass2 = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(3)]
    iv = _iv(keep_rest="all")
    outs = _two_passes(iv, DenoisedFill([iv]), pass1, pass2, _guide({0: HOLE, 1: HOLE}, {0: True, 1: False}))
    hole = _hole_pixels(HOLE, 16, 16)
    idx = cell_sources(pass1[-1][0], HOLE)  # sources and values: pass 1's last prediction
    for k, out in enumerate(outs):
        want = _pinned(pass1[-1][0], pass1[k][0], HOLE, idx)  # pass 1's call k outside, the fill inside
        torch.testing.assert_close(out[0], want, rtol=0, atol=0)
        torch.testing.assert_close(out[0][:, ~hole], pass1[k][0][:, ~hole], rtol=0, atol=0)
        torch.testing.assert_close(out[1], pass2[k][1], rtol=0, atol=0)
    # a pass 2 that calls the model more often than pass 1 did: the extra calls are only filled
    extra = torch.rand(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(DenoisedFill([iv])(extra)[0], _pinned(pass1[-1][0], extra[0], HOLE, idx), rtol=0, atol=0)
    iv.end_lookahead()
    assert iv.fill_memory == {}


def test_keep_rest_objects_keeps_only_other_objects_and_off_keeps_nothing():
    g = torch.Generator().manual_seed(4)
    pass1 = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(2)]
    pass2 = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(2)]
    sal = torch.zeros(8, 8)
    sal[5:7, 2:4] = 0.9  # pass 1 drew another object there
    sal[2:4, 2:4] = 0.9  # and the target (inside the guide: filled, not kept)
    obj = _hole_pixels(sal >= 0.5, 16, 16) & ~_hole_pixels(HOLE, 16, 16)
    outs = {}
    for how in ("objects", "off"):
        iv = _iv(keep_rest=how)
        outs[how] = _two_passes(iv, DenoisedFill([iv]), pass1, pass2, _guide({0: HOLE}, {0: True}), {0: sal})
    idx = cell_sources(pass1[-1][0], HOLE, sal)
    for k in range(2):
        fill_only = _pinned(pass1[-1][0], pass2[k][0], HOLE, idx)
        torch.testing.assert_close(outs["off"][k][0], fill_only, rtol=0, atol=0)
        want = fill_only.clone()
        want[:, obj] = pass1[k][0][:, obj]
        torch.testing.assert_close(outs["objects"][k][0], want, rtol=0, atol=0)
    assert int(obj.sum()) == 16  # the other object's 2x2 cells of 2x2 pixels


def test_keep_rest_on_packed_tokens_and_a_grid_finer_than_the_prediction():
    g = torch.Generator().manual_seed(5)
    # packed tokens [B, N, D] (one per cell of the 8x8 guide): kept tokens are pass 1's of the same call
    p1 = [torch.rand(1, 64, 4, generator=g) for _ in range(2)]
    p2 = [torch.rand(1, 64, 4, generator=g) for _ in range(2)]
    iv = _iv(keep_rest="all")
    outs = _two_passes(iv, DenoisedFill([iv]), p1, p2, _guide({0: HOLE}, {0: True}))
    flat_hole = HOLE.reshape(-1)
    for k in range(2):
        torch.testing.assert_close(outs[k][0, ~flat_hole], p1[k][0, ~flat_hole], rtol=0, atol=0)
        assert not torch.equal(outs[k][0, flat_hole], p2[k][0, flat_hole])  # filled
    # a 16x16 guide over an 8x8 prediction: a pixel is kept only if none of its cells is filled
    fine = torch.zeros(16, 16, dtype=torch.bool)
    fine[5, 5] = True  # one fine cell: the pixel (2, 2) it lies in is filled, not kept
    d1 = [torch.rand(1, 2, 8, 8, generator=g)]
    d2 = [torch.rand(1, 2, 8, 8, generator=g)]
    iv = _iv(keep_rest="all")
    out = _two_passes(iv, DenoisedFill([iv]), d1, d2, _guide({0: fine}, {0: True}))[0]
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2, 2] = False
    torch.testing.assert_close(out[0][:, keep], d1[0][0][:, keep], rtol=0, atol=0)


# -- hole "object": only the detected object's pixels of the cells are emptied ----------------------------------


def test_erode_cells_matches_the_definition():
    """A cell is in the core where its whole (2p+1)^2 neighbourhood inside the grid is in the cells; the cells
    themselves when that leaves none."""
    g = torch.Generator().manual_seed(6)
    for p in (1, 2):
        for _ in range(4):
            cells = torch.rand(7, 9, generator=g) > 0.25
            want = torch.zeros_like(cells)
            for i in range(7):
                for j in range(9):
                    want[i, j] = bool(cells[max(0, i - p):i + p + 1, max(0, j - p):j + p + 1].all())
            got = erode_cells(cells, p)
            assert torch.equal(got, want if want.any() else cells)
    assert torch.equal(erode_cells(HOLE, 0), HOLE)
    assert torch.equal(erode_cells(HOLE, 1), HOLE)  # a 2x2 block has no interior at padding 1: kept whole


def _two_objects(gap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1's picture [3, 16, 16] on a black background: the detected object, red, on pixels 4..7 x 4..7 (cells
    (2, 2)..(3, 3) of an 8x8 grid), a green neighbour from column 8 + gap to 11 on rows 4..7; the cells to fill: the
    object's cells padded by one (pixels 2..9 x 2..9), so the neighbour's first columns lie inside them."""
    img = torch.zeros(3, 16, 16)
    img[0, 4:8, 4:8] = 1.0
    img[1, 4:8, 8 + gap:12] = 1.0
    core = HOLE.clone()
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[1:5, 1:5] = True
    return img, cells, core


@pytest.mark.parametrize("gap", [0, 1])
def test_object_pixels_are_the_object_grown_by_one_pixel_not_the_neighbour(gap):
    img, cells, core = _two_objects(gap)
    got = object_pixels(img, cells, None, core).view(16, 16)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[3:9, 3:9] = True  # the red object (4..7) and one pixel around it, all inside the cells (2..9)
    assert torch.equal(got, want)
    green = img[1] > 0
    assert int((got & green).sum()) == (4 if gap == 0 else 0)  # touching: the one-pixel edge takes its first column
    # the detector's own cells are always emptied, whatever they hold: a core cell over the neighbour takes it too
    core2 = core.clone()
    core2[2:4, 4] = True  # pixels 4..7 x 8..9
    got2 = object_pixels(img, cells, None, core2).view(16, 16)
    want2 = want.clone()
    want2[4:8, 8:10] = True
    assert torch.equal(got2, want2)


def test_object_pixels_give_up_where_the_core_looks_like_the_background():
    img, cells, core = _two_objects(1)
    img[0] = 0.0  # pass 1 drew no object in the core: nothing stands out, the fill empties the whole cells
    assert object_pixels(img, cells, None, core) is None
    assert object_pixels(img, torch.zeros(8, 8, dtype=torch.bool)) is None
    img2, cells2, core2 = _two_objects(1)
    img2[0, 0, 0] = float("nan")
    assert object_pixels(img2, cells2, None, core2) is None  # non-finite picture: whole cells


def test_object_pixels_read_the_background_from_calm_cells():
    """Salient cells outside the hole are not background: an object there in the target's colour does not make
    the target look like the background."""
    img, cells, core = _two_objects(1)
    img[0, 12:16, 0:4] = 1.0  # another red object far away, salient
    sal = torch.zeros(8, 8)
    sal[6:8, 0:2] = 0.9
    assert object_pixels(img, cells, None, core) is None  # counted as background: red is background-like
    got = object_pixels(img, cells, sal, core).view(16, 16)
    assert bool(got[4:8, 4:8].all()) and not bool(got[4:8, 9:12].any())


def test_fill_with_hole_object_keeps_the_neighbour_inside_the_padding():
    """hole "object" with keep_rest "all": pass 2's call k is pass 1's call k everywhere but on the object's pixels,
    which the fill takes from background cells; the neighbour's pixels inside the padded cells stay pass 1's."""
    img, cells, core = _two_objects(1)
    sal = torch.zeros(8, 8)
    sal[2:4, 2:6] = 0.9  # pass 1's salience: the object and the neighbour
    g = torch.Generator().manual_seed(8)
    pass1 = [img[None] + 0.01 * k for k in range(2)] + [img[None]]
    pass2 = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(3)]
    outs = {}
    for hole in ("object", "cells"):
        iv = _iv(keep_rest="all", hole=hole)
        iv.detector.settings = replace(iv.detector.settings, padding=1)
        outs[hole] = _two_passes(iv, DenoisedFill([iv]), pass1, pass2, _guide({0: cells}, {0: True}), {0: sal})
    obj = object_pixels(img, cells, sal, core)
    assert obj is not None and int(obj.sum()) == 36
    idx = cell_sources(img, cells, sal)
    for k, out in enumerate(outs["object"]):
        flat = out[0].flatten(1)
        torch.testing.assert_close(flat[:, ~obj], pass1[k][0].flatten(1)[:, ~obj], rtol=0, atol=0)
        torch.testing.assert_close(flat[:, obj], img.flatten(1)[:, idx[obj]], rtol=0, atol=0)
    last = outs["object"][-1][0]
    assert bool((last[1, 4:8, 9:12] == 1).all()) and not bool(last[0, 4:8, 4:8].any())  # neighbour whole, red gone
    # with whole cells the fill paints background over the neighbour's column inside the padding
    assert not bool(outs["cells"][-1][0, 1, 4:8, 9].any())


def test_keep_rest_objects_keeps_the_neighbours_pixels_the_object_hole_gives_back():
    """keep_rest "objects" with hole "object": the kept pixels are those of salient cells outside the object's pixels,
    so the neighbour's column inside the padded cells (a salient cell the fill no longer empties) is pass 1's
    prediction of the same call; the object's pixels are filled; the rest is pass 2's own prediction."""
    img, cells, core = _two_objects(1)
    sal = torch.zeros(8, 8)
    sal[2:4, 2:6] = 0.9
    g = torch.Generator().manual_seed(9)
    pass1 = [img[None] + 0.01 * k for k in range(2)] + [img[None]]
    pass2 = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(3)]
    iv = _iv(keep_rest="objects", hole="object")
    iv.detector.settings = replace(iv.detector.settings, padding=1)
    outs = _two_passes(iv, DenoisedFill([iv]), pass1, pass2, _guide({0: cells}, {0: True}), {0: sal})
    obj = object_pixels(img, cells, sal, core)
    salient = _hole_pixels(sal >= 0.5, 16, 16).reshape(-1)
    kept = salient & ~obj
    assert int(kept.sum()) == 12 and bool(kept.view(16, 16)[4:8, 9].all())  # the neighbour, column 9 in the padding
    idx = cell_sources(img, cells, sal)
    for k, out in enumerate(outs):
        flat = out[0].flatten(1)
        torch.testing.assert_close(flat[:, kept], pass1[k][0].flatten(1)[:, kept], rtol=0, atol=0)
        torch.testing.assert_close(flat[:, obj], img.flatten(1)[:, idx[obj]], rtol=0, atol=0)
        rest = ~kept & ~obj
        torch.testing.assert_close(flat[:, rest], pass2[k][0].flatten(1)[:, rest], rtol=0, atol=0)


def test_hole_is_checked_and_defaults_to_object():
    assert ReplaceSettings().hole == "object"
    assert ReplaceSettings.from_dict({"mode": "background", "denoised": True}).hole == "object"
    for bad in ("pixels", 1, None):
        with pytest.raises(SAEInputError, match=r"ReplaceSettings.hole is .*, expected one of \['object', 'cells'\]"):
            ReplaceSettings("background", denoised=True, hole=bad)
