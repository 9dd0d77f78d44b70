"""The hot path's shortcuts equal the plain dense path bit for bit: TopK picking, TopK-path interventions, layout."""

import pytest
import torch
from einops import rearrange
from planted import planted_maps, planted_sae

from sae_core.concepts import ConceptDictionary, ConceptStep
from sae_core.detect import ConceptDetector, DetectionSettings, detect, detect_picked, pick_topk
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from sae_core.steer import SteerSettings, steer, steer_picked

TOPK = ["relu_topk", "topk_relu", "sigmoid_topk", "groupmax"]


class DenseOnly:
    """The same SAE without encode_topk: BlockIntervention then takes the dense [.., M] path (the reference)."""

    def __init__(self, sae):
        self._sae = sae

    def __getattr__(self, name):
        if name == "encode_topk":
            raise AttributeError(name)
        return getattr(self._sae, name)


def topk_sae(activation, normalization="none", seed=0):
    k = 4 if activation != "groupmax" else 6
    return planted_sae(d=16, M=24, activation=activation, k=k, normalization=normalization, seed=seed)


@pytest.mark.parametrize("activation", TOPK)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pick_topk_equals_dense_columns(activation, dtype):
    sae, _ = topk_sae(activation)
    x = torch.randn(3, 5, 7, 16, dtype=dtype)
    dense = sae.encode(x)
    tk = sae.encode_topk(x)
    lat = torch.tensor([0, 23, 5, 11, 2])  # kept somewhere and never kept
    picked = pick_topk(tk.values, tk.indices, lat)
    ref = dense[..., lat]
    assert picked.dtype == dense.dtype
    assert torch.equal(picked, ref)
    assert (ref != 0).any() and (ref == 0).any()  # the test sees both kept and dropped latents


def test_detect_picked_equals_detect_and_rejects_wrong_width():
    sae, _ = topk_sae("relu_topk")
    codes = sae.encode(torch.randn(2, 6, 4, 16))
    step = ConceptStep(torch.tensor([3, 0]), torch.tensor([0.05, 0.1]), torch.tensor([1.0, 1.0]),
                       torch.tensor([0, 0]), 0.0)
    s = DetectionSettings(threshold_scale=0.7, padding=1)
    a, b = detect(codes, step, s), detect_picked(codes[..., step.latents], step, s)
    assert torch.equal(a.score, b.score) and torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="picked codes have 1 latents, the step selects 2"):
        detect_picked(codes[..., :1], step, s)


@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
@pytest.mark.parametrize("settings", [SteerSettings("saeuron_scale", -3.0), SteerSettings("set", 0.0, detected_only=True),
                                      SteerSettings("saeuron_scale", -2.0, error="legacy_saeuron"),
                                      SteerSettings("unbox_add", 2.0, error="none")])
def test_steer_picked_equals_steer(normalization, settings):
    sae, _ = topk_sae("topk_relu", normalization)
    x = torch.randn(2, 5, 3, 16)
    codes, norm = sae.encode_with_norm(x)
    step = ConceptStep(torch.tensor([1, 4]), torch.tensor([0.0, 0.02]), torch.tensor([0.5, 2.0]),
                       torch.tensor([0, 0]), 0.0)
    mask = torch.rand(2, 5, 3) > 0.5
    ref = steer(sae, x, codes, norm, step, mask, settings)
    tk = sae.encode_topk(x)
    dense = tk.values.new_zeros(codes.shape).scatter_(-1, tk.indices, tk.values)
    got = steer_picked(sae, x, pick_topk(tk.values, tk.indices, step.latents), lambda: dense, tk.norm, step, mask,
                       settings)
    assert torch.equal(got.values, ref.values) and torch.equal(got.changed, ref.changed)
    assert ref.changed.any()


EDITS = [None, ReplaceSettings("random", seed=5), ReplaceSettings("nearest", target="residual"),
         SteerSettings("saeuron_scale", -4.0), SteerSettings("gsae_add", 0.5, detected_only=True),
         SteerSettings("set", 0.0, error="legacy_saeuron")]


@pytest.mark.parametrize("activation", ["relu_topk", "groupmax"])
@pytest.mark.parametrize("edit", EDITS, ids=lambda e: "detect" if e is None else f"{type(e).__name__}-{e.mode if hasattr(e, 'mode') else e.method}")
@pytest.mark.parametrize("chunks,branches", [((0, 1, 0), "cond"), ((1, 0), "both"), ((0,), "both")])
def test_topk_intervention_equals_dense_intervention(activation, edit, chunks, branches):
    sae, u = topk_sae(activation)
    pm = planted_maps(2 * len(chunks), 5, 6, u, seed=1)
    det = ConceptDetector(ConceptDictionary.from_latents([0, 7], 24, threshold=0.5, means=[0.5, 1.0]))
    step = StepInfo(400.0, chunks=chunks, step_index=3)
    recs = [Recorder(), Recorder()]
    fast = BlockIntervention(sae, det, edit, branches=branches, recorder=recs[0])
    slow = BlockIntervention(DenseOnly(sae), det, edit, branches=branches, recorder=recs[1])
    x_in = pm.block_out - 0.3 * torch.randn_like(pm.block_out)
    a, b = fast(x_in, pm.block_out, step), slow(x_in, pm.block_out, step)
    assert torch.equal(a, b)
    assert (a is pm.block_out) == (b is pm.block_out)
    if edit is not None:
        assert a is not pm.block_out  # the planted concept is detected and edited
    assert len(recs[0].records) == len(recs[1].records) > 0
    for r, s in zip(recs[0].records, recs[1].records, strict=True):
        assert torch.equal(r.bits, s.bits) and torch.equal(r.score, s.score) and r.all_detected == s.all_detected


def test_full_batch_steer_keeps_layout_and_does_not_alias():
    sae, u = topk_sae("relu_topk")
    pm = planted_maps(4, 6, 5, u, seed=2)
    det = ConceptDetector(ConceptDictionary.from_latents([0], 24, threshold=0.5, means=[0.5]))
    iv = BlockIntervention(sae, det, SteerSettings("saeuron_scale", -4.0))
    y = iv(None, pm.block_out, StepInfo(10.0, chunks=(1, 0)))
    assert y.is_contiguous() and y.data_ptr() != pm.block_out.data_ptr()
    ref_codes, norm = sae.encode_with_norm(rearrange(pm.block_out, "b c h w -> b h w c"))
    cstep = det.step(10.0)
    d = detect(ref_codes, cstep, det.settings)
    ref = steer(sae, rearrange(pm.block_out, "b c h w -> b h w c"), ref_codes, norm, cstep, d.mask, iv.edit)
    assert torch.equal(y, rearrange(ref.values, "b h w c -> b c h w"))


def test_detector_step_cache_matches_lookup():
    d = ConceptDictionary.from_latents([2, 5], 24, threshold=0.25, means=[1.0, 2.0])
    det = ConceptDetector(d)
    a, b = det.step(300.0), det.step(300.0)
    assert a is b
    ref = d.at(300.0)
    assert torch.equal(a.latents, ref.latents) and torch.equal(a.thresholds, ref.thresholds)
