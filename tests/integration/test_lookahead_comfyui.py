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
