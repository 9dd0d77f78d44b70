"""Presence gate and look-ahead (two passes from the same noise in the OUTER_SAMPLE wrapper) through ComfyUI's
real sampler on a tiny SD1 UNet."""

import dataclasses

import comfy.patcher_extension
import pytest
import torch
from test_nodes_comfyui import SD1_BLOCK, busy_latents, make_sae, typed_detector, with_capture
from tiny_unets import sample

OUTER = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def gated_detector(pack, sae, ids, gate: float, **kw):
    """A Concept Detector over typed latents whose concept carries a presence gate of ``gate`` at every step."""
    spec = typed_detector(pack, sae, ids, **kw)
    det = spec.detector
    d, names = det.sources[0]
    T = d.timesteps.numel()
    gated = dataclasses.replace(d, gate=torch.full((1, T), gate), reliable=torch.ones(1, T, dtype=torch.bool))
    settings = dataclasses.replace(det.settings, gate=True)
    new = pack.sae_core.detect.ConceptDetector([(gated, names)], settings, sae=sae)
    return dataclasses.replace(spec, detector=new)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_look_ahead_with_nothing_detected_is_bit_identical(pack, sd1, sampler):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    base = sample(sd1.model, "sd1", sampler=sampler)
    nothing = typed_detector(pack, sae, ids, typed_threshold=1e6)
    m, det = ext.PatchReplacer.execute(sd1.model, nothing, mode="background", target="output", seed=0,
                                       look_ahead=True).args
    torch.testing.assert_close(sample(m, "sd1", sampler=sampler), base, rtol=0, atol=0)
    assert det.recorder.keys() == [0, 1, 2]  # pass 2 recorded, once per step


def test_look_ahead_passes_see_the_same_noise_and_pass_two_edits_from_step_one(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    base_model, base_cap = with_capture(pack, sd1.model, key)
    base = sample(base_model, "sd1")
    det = typed_detector(pack, sae, ids, padding=0)
    captured, cap = with_capture(pack, sd1.model, key)
    m, dets = ext.PatchReplacer.execute(captured, det, mode="random", target="output", seed=0, look_ahead=True).args
    out = sample(m, "sd1")
    steps = len(base_cap.calls)
    assert len(cap.calls) == 2 * steps  # the capture sits before the replacer: it sees both passes
    for (_, a, _), (_, b, _) in zip(cap.calls[:steps], base_cap.calls, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # pass 1 = the unpatched trajectory, same noise
    assert not torch.equal(out, base)
    keys, masks = dets.recorder.masks("cond", 0)
    assert keys == list(range(steps)) and masks[0].any()  # pass 2 edits at the first step


def test_presence_gate_through_the_sampler(pack, sd1):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    base = sample(sd1.model, "sd1")
    closed = gated_detector(pack, sae, ids, gate=1.0)  # would need every patch detected: never opens
    m, det = ext.PatchReplacer.execute(sd1.model, closed, mode="random", target="output", seed=0, look_ahead=False).args
    torch.testing.assert_close(sample(m, "sd1"), base, rtol=0, atol=0)
    assert det.recorder.records and not any(r.mask().any() for r in det.recorder.records)
    opened = gated_detector(pack, sae, ids, gate=1e-6)
    m2, det2 = ext.PatchReplacer.execute(sd1.model, opened, mode="random", target="output", seed=0, look_ahead=False).args
    assert not torch.equal(sample(m2, "sd1"), base)


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_call", [1, 5])  # 3 steps x 1 call: call 1 is in pass 1, call 5 in pass 2
def test_error_in_either_pass_leaves_nothing_patched(pack, sd1, fail_call):
    ext = pack.nodes.extension
    hook = pack.nodes.hook
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    base = sample(sd1.model, "sd1")
    n = []

    def bomb(block_in, block_out, step):
        n.append(1)
        if len(n) == fail_call:
            raise Boom()
        return block_out

    state = hook.RunState("bomb")
    armed = hook.install_patch(sd1.model, "diffusion_model." + key, bomb, state, OUTER)
    m, det = ext.PatchReplacer.execute(armed, typed_detector(pack, sae, ids), mode="random", target="output", seed=0,
                                       look_ahead=True).args
    with pytest.raises(Boom):
        sample(m, "sd1")
    iv = det.intervention
    assert iv.phase == "single" and iv.guide is None and det.active == 0
    assert not sd1.model.object_patches
    torch.testing.assert_close(sample(sd1.model, "sd1"), base, rtol=0, atol=0)


def steady_latents(pack, sae, model, key, batch):
    """A latent active on some but not all patches of the cond rows at every step of a 3-step run (so look-ahead's
    votes keep a guide mask that leaves cells to copy from)."""
    m, cap = with_capture(pack, model, key)
    sample(m, "sd1", batch=batch)
    shares = torch.stack([(sae.encode(out.movedim(1, -1)) > 0).float().flatten(1, 2).mean(1) for _, out, _ in cap.calls])
    lo, hi = shares.amin((0, 1)), shares.amax((0, 1))  # over steps and rows: [M]
    margin = torch.minimum(lo, 1 - hi)
    assert float(margin.max()) > 0, "no latent of the tiny model is active on part of every map"
    return [int(margin.argmax())]


@pytest.mark.parametrize("keep_rest", ["off", "all"])
@pytest.mark.parametrize("batch", [1, 2])
def test_denoised_fill_copies_background_cells_of_the_prediction_in_pass_two(pack, sd1, batch, keep_rest):
    """Patch Replacer's denoised_fill through ComfyUI's sampler: pass 1's predictions pass unchanged; in pass 2
    every step's CFG-combined prediction has the cells to fill (the guide's and those pass 2 edited by then,
    ``fill_masks``) take pass 1's last prediction at the cells ``cell_sources`` picks on it; every other pixel
    stays as predicted (keep_rest off) or takes pass 1's prediction of the same step (all), so the sampled latent
    outside the last step's cells to fill is bit-identical to the unpatched model's; the unpatched model never
    carries the post-CFG function."""
    ext = pack.nodes.extension
    cell_sources = pack.sae_core.denoised.cell_sources
    fill_masks = pack.sae_core.denoised.fill_masks
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = steady_latents(pack, sae, sd1.model, key, batch)
    det = typed_detector(pack, sae, ids, padding=0)
    base = sample(sd1.model, "sd1", batch=batch)
    m, dets = ext.PatchReplacer.execute(sd1.model, det, mode="background", target="output", seed=0,
                                        look_ahead=True, denoised_fill=True, keep_rest=keep_rest).args
    assert "sampler_post_cfg_function" not in sd1.model.model_options
    before, after, guides = [], [], []
    fns = m.model_options["sampler_post_cfg_function"]
    assert len(fns) == 1
    fns.insert(0, lambda args: before.append(args["denoised"].clone()) or args["denoised"])
    iv = dets.intervention
    edits, sals = [], []

    def keep(args):  # after the fill: the prediction, and the cells pass 2 had edited by then with pass 1's salience
        after.append(args["denoised"].clone())
        if iv.phase == "edit":
            edits.append({j: e.clone() for j, e in iv.fill_edited().items()})
            sals.append(dict(iv.fill_salience()))
        return args["denoised"]

    fns.append(keep)
    begin = iv.begin_edit_pass
    iv.begin_edit_pass = lambda guide: (guides.append(guide), begin(guide))[1]
    out = sample(m, "sd1", batch=batch)
    steps = len(before) // 2
    assert steps == 3 and len(guides) == 1
    for a, b in zip(before[:steps], after[:steps], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # pass 1: untouched
    final, guide = after[steps - 1], guides[0]
    hw = tuple(next(iter(guide.masks.values())).shape)
    masks, present = guide.rows(list(range(batch)), hw, "cpu")
    assert present.all() and masks.any()
    assert len(edits) == steps
    for a, b, edited, sal, first in zip(before[steps:], after[steps:], edits, sals, after[:steps], strict=True):
        for i in range(batch):
            cells = fill_masks(masks[i], edited.get(i), sal.get(i))
            idx = cell_sources(final[i], cells, sal.get(i))
            C, H, W = a[i].shape
            ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            hole = cells[(ys * cells.shape[0]) // H, (xs * cells.shape[1]) // W]  # the pixels of the cells to fill
            want = (a[i] if keep_rest == "off" else first[i]).clone()
            want[:, hole] = final[i].flatten(1)[:, idx].view(C, H, W)[:, hole]
            torch.testing.assert_close(b[i], want, rtol=0, atol=0)
            assert not torch.equal(b[i], a[i])
    if keep_rest == "all":  # the same noise and sampler: outside the hole the unedited picture, bit for bit
        assert not torch.equal(out, base)
        for i in range(batch):
            cells = fill_masks(masks[i], edits[-1].get(i), sals[-1].get(i))
            hole = cells[(ys * cells.shape[0]) // H, (xs * cells.shape[1]) // W]
            torch.testing.assert_close(out[i][:, ~hole], base[i][:, ~hole], rtol=0, atol=0)
    m2, _ = ext.PatchReplacer.execute(sd1.model, det, mode="background", target="output", seed=0,
                                      look_ahead=True, denoised_fill=False).args
    assert "sampler_post_cfg_function" not in m2.model_options
    assert not torch.equal(out, sample(m2, "sd1", batch=batch))


def test_denoised_fill_without_look_ahead_is_off_and_says_so(pack, sd1, caplog):
    ext = pack.nodes.extension
    name, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    with caplog.at_level("INFO"):
        m, dets = ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids), mode="random", target="output",
                                            seed=0, look_ahead=False, denoised_fill=True).args
    assert "denoised_fill is off" in caplog.text and "keep_rest 'all' is off too" in caplog.text
    assert "sampler_post_cfg_function" not in m.model_options
    assert dets.intervention.edit.denoised is False
    caplog.clear()
    with caplog.at_level("INFO"):
        ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids), mode="random", target="output", seed=0,
                                  look_ahead=True, denoised_fill=False, keep_rest="objects")
    assert "keep_rest 'objects' is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # nothing to say when keep_rest is off, or when the fill is on
        ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids), mode="random", target="output", seed=0,
                                  look_ahead=True, denoised_fill=False, keep_rest="off")
        ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids), mode="random", target="output", seed=0,
                                  look_ahead=True, denoised_fill=True, keep_rest="all")
    assert "is ignored" not in caplog.text and "is off too" not in caplog.text
