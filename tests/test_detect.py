"""Detection on the planted set: exact masks, exact dilation, region filtering, score values."""

import pytest
import torch
from einops import rearrange
from planted import planted_maps, planted_sae

from sae_core.concepts import ConceptDictionary
from sae_core.detect import (
    ConceptDetector,
    DetectionSettings,
    detect,
    dilate_mask,
    drop_small_regions,
    score_map,
)

GRIDS = [(5, 7), (6, 4), (1, 9), (8, 8)]


def ref_dilate(mask, p):
    B, H, W = mask.shape
    out = torch.zeros_like(mask)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                out[b, i, j] = bool(mask[b, max(0, i - p):i + p + 1, max(0, j - p):j + p + 1].any())
    return out


def ref_components(mask2d):
    """8-connected components by BFS -> list of sets of (i, j)."""
    H, W = mask2d.shape
    seen, comps = set(), []
    for i in range(H):
        for j in range(W):
            if mask2d[i, j] and (i, j) not in seen:
                stack, comp = [(i, j)], set()
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    comp.add((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            na, nb = a + da, b + db
                            if 0 <= na < H and 0 <= nb < W and mask2d[na, nb] and (na, nb) not in seen:
                                seen.add((na, nb))
                                stack.append((na, nb))
                comps.append(comp)
    return comps


def planted_codes(H, W, B=3):
    sae, u = planted_sae()
    pm = planted_maps(B, H, W, u)
    codes = sae.encode(rearrange(pm.block_out, "b c h w -> b h w c"))
    return sae, pm, codes


def iou(a, b):
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.parametrize("hw", GRIDS)
def test_planted_mask_is_exact_at_padding_0(hw):
    sae, pm, codes = planted_codes(*hw)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=None)
    d, _ = det(codes, 500.0)
    assert iou(d.mask, pm.region) == 1.0
    assert torch.equal(d.mask, pm.region)


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("p", [1, 2])
def test_padding_is_exact_dilation(hw, p):
    sae, pm, codes = planted_codes(*hw)
    step = ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0).at(0.0)
    d = detect(codes, step, DetectionSettings(padding=p))
    assert torch.equal(d.mask, ref_dilate(pm.region, p))
    assert torch.equal(dilate_mask(pm.region, p), ref_dilate(pm.region, p))


@pytest.mark.parametrize("hw", GRIDS)
def test_score_map_matches_reference(hw):
    sae, pm, codes = planted_codes(*hw)
    lat = torch.tensor([0, 3, 5])
    tau = torch.tensor([1.0, 0.2, 0.4])
    got = score_map(codes, lat, tau, scale=1.5)
    ref = torch.stack([codes[..., i] - 1.5 * t for i, t in zip(lat.tolist(), tau.tolist(), strict=True)], -1).max(-1).values
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("min_size", [2, 3, 5])
def test_min_region_matches_bfs(min_size):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 9, 6, generator=g) > 0.7
    got = drop_small_regions(mask, min_size)
    ref = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        for comp in ref_components(mask[b]):
            if len(comp) >= min_size:
                for i, j in comp:
                    ref[b, i, j] = True
    assert torch.equal(got, ref)


def test_min_region_drops_the_planted_single_patch_then_pads():
    sae, pm, codes = planted_codes(7, 5, B=2)
    step = ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0).at(0.0)
    d = detect(codes, step, DetectionSettings(min_region=2, padding=1))
    kept = drop_small_regions(pm.region, 2)
    assert torch.equal(d.mask, ref_dilate(kept, 1))


def test_threshold_scale_and_empty_concept():
    sae, pm, codes = planted_codes(5, 7)
    step = ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0).at(0.0)
    assert not detect(codes, step, DetectionSettings(threshold_scale=3.1)).mask.any()  # amplitudes < 3
    empty = step._replace(latents=step.latents[:0], thresholds=step.thresholds[:0])
    d = detect(codes, empty)
    assert not d.mask.any() and torch.isneginf(d.score).all()


def test_union_of_two_concepts():
    sae, pm, codes = planted_codes(5, 7)
    M = sae.cfg.n_latents
    a = ConceptDictionary.from_latents([0], M, threshold=1.0, name="a")
    b = ConceptDictionary.from_latents([4], M, threshold=0.05, name="b")
    det = ConceptDetector([(a, None), (b, ["b"])])
    d, st = det(codes, 10.0)
    ref = (codes[..., 0] > 1.0) | (codes[..., 4] > 0.05)
    assert torch.equal(d.mask, ref) and st.latents.tolist() == [0, 4]


@pytest.mark.parametrize("kwargs,msg", [
    ({"threshold_scale": -1.0}, "threshold_scale is -1.0"),
    ({"padding": -1}, "padding is -1"),
    ({"padding": 1.5}, "padding is 1.5"),
    ({"min_region": -2}, "min_region is -2"),
    ({"min_share": -0.1}, "min_share is -0.1"),
    ({"min_share": 1.5}, "min_share is 1.5"),
])
def test_settings_reject(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        DetectionSettings(**kwargs)


def test_settings_round_trip():
    s = DetectionSettings(2.0, 1, 3)
    assert DetectionSettings.from_dict(s.to_dict()) == s


def test_token_codes_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"expected \[B, H, W, M\]; reshape token codes"):
        score_map(torch.zeros(2, 35, 8), torch.tensor([0]), torch.tensor([1.0]))


def test_detector_rejects_wrong_width_and_unknown_names():
    d = ConceptDictionary.from_latents([0], 24, name="cat")
    det = ConceptDetector(d)
    with pytest.raises(ValueError, match="codes have 16 latents, the concepts expect 24"):
        det(torch.zeros(1, 2, 2, 16), 0.0)
    with pytest.raises(KeyError, match="'dog' is not in this dictionary"):
        ConceptDetector([(d, ["dog"])])
    with pytest.raises(ValueError, match="different widths"):
        ConceptDetector([(d, None), (ConceptDictionary.from_latents([0], 30), None)])
    with pytest.raises(ValueError, match="no concept given"):
        ConceptDetector([])


def test_detector_checks_the_sae_fingerprint():
    sae, _ = planted_sae()
    other, _ = planted_sae(seed=9)
    d = ConceptDictionary.from_latents([0], 24, sae_fingerprint=sae.fingerprint())
    ConceptDetector(d, sae=sae)
    with pytest.raises(ValueError, match=f"fingerprint {sae.fingerprint()}.*fingerprint {other.fingerprint()}"):
        ConceptDetector(d, sae=other)
    kept = ConceptDictionary.from_latents([1], 24, name="kept", sae_fingerprint=other.fingerprint())
    with pytest.raises(ValueError, match=f"fingerprint {other.fingerprint()}.*fingerprint {sae.fingerprint()}"):
        ConceptDetector(d, sae=sae, keep=kept)  # a concept to keep learned with another SAE


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_min_share_keeps_patches_the_concept_explains(share):
    """A patch counts only where the selected latents above threshold carry >= min_share of its code mass;
    reference: the definition per patch in plain Python. Dense codes and TopK codes give the same mask."""
    from sae_core.detect import code_mass, pick_topk
    from sae_core.sae import TopKCodes

    g = torch.Generator().manual_seed(3)
    M, k = 12, 4
    dense = torch.rand(2, 4, 5, M, generator=g) * 3
    top = dense.topk(k, -1)
    codes = torch.zeros_like(dense).scatter(-1, top.indices, top.values)  # TopK-sparse
    d = ConceptDictionary.from_latents([1, 6, 9], M, threshold=0.5)
    st = d.at(0.0)
    settings = DetectionSettings(min_share=share)
    got = detect(codes, st, settings).mask
    want = torch.zeros_like(got)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                row = codes[b, i, j].tolist()
                on = [row[x] for x in (1, 6, 9) if row[x] > 0.5]
                want[b, i, j] = bool(on) and sum(on) / sum(row) >= share
    assert torch.equal(got, want)
    assert want.any() and (detect(codes, st).mask & ~want).any()  # the share removes some detected patches
    det = ConceptDetector(d, settings)
    fast = det.detect_codes(TopKCodes(top.values, top.indices, None), 0.0).detection.mask
    assert torch.equal(fast, want)
    torch.testing.assert_close(code_mass(top.values), code_mass(codes))
    picked = pick_topk(top.values, top.indices, st.latents)
    with pytest.raises(ValueError, match="needs each patch's code mass"):
        det.detect_picked(picked, st)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_keep_concepts_drop_patches_another_concept_explains_better(scale):
    """With concepts to keep, a patch counts only where the detected concepts' latents above scale * tau carry at
    least the share of its code mass that each kept concept's latents above scale * tau carry (each kept concept on
    its own, not their union); reference: the definition per patch in plain Python. Dense codes, TopK codes and
    ``__call__`` give the same mask; padding acts after the rule."""
    from sae_core.detect import pick_topk
    from sae_core.sae import TopKCodes

    g = torch.Generator().manual_seed(5)
    M, k = 12, 4
    dense = torch.rand(2, 6, 5, M, generator=g) * 3
    top = dense.topk(k, -1)
    codes = torch.zeros_like(dense).scatter(-1, top.indices, top.values)
    d = ConceptDictionary.from_latents([1, 6, 9], M, threshold=0.5, name="target")
    # two kept concepts; latent 6 is shared with the target, so it counts on both sides
    k1 = ConceptDictionary.from_latents([2, 6], M, threshold=0.5, name="one")
    k2 = ConceptDictionary.from_latents([3, 4, 7], M, threshold=0.9, name="two")

    def share(row, ids, tau):
        on = [row[x] for x in ids if row[x] > scale * tau]
        return sum(on) / sum(row) if sum(row) > 0 else 0.0

    want = torch.zeros(2, 6, 5, dtype=torch.bool)
    union_rule = torch.zeros_like(want)
    for b in range(2):
        for i in range(6):
            for j in range(5):
                row = codes[b, i, j].tolist()
                own = share(row, (1, 6, 9), 0.5)
                raw = any(row[x] > scale * 0.5 for x in (1, 6, 9))
                want[b, i, j] = raw and own >= max(share(row, (2, 6), 0.5), share(row, (3, 4, 7), 0.9))
                union_rule[b, i, j] = raw and own >= share(row, (2, 6), 0.5) + share(row, (3, 4, 7), 0.9)
    settings = DetectionSettings(threshold_scale=scale)
    det = ConceptDetector(d, settings, keep=[(k1, None), (k2, ["two"])])
    plain = ConceptDetector(d, settings)
    got, st = det(codes, 0.0)
    assert torch.equal(got.mask, want)
    assert (plain(codes, 0.0)[0].mask & ~want).any()  # the rule removes detected patches
    assert not torch.equal(want, union_rule)  # each kept concept on its own
    fast = det.detect_codes(TopKCodes(top.values, top.indices, None), 0.0).detection.mask
    assert torch.equal(fast, want)
    padded = ConceptDetector(d, DetectionSettings(threshold_scale=scale, padding=1), keep=k1)
    one = torch.zeros_like(want)
    for b in range(2):
        for i in range(6):
            for j in range(5):
                row = codes[b, i, j].tolist()
                one[b, i, j] = any(row[x] > scale * 0.5 for x in (1, 6, 9)) and \
                    share(row, (1, 6, 9), 0.5) >= share(row, (2, 6), 0.5)
    assert torch.equal(padded(codes, 0.0)[0].mask, dilate_mask(one, 1))
    picked = pick_topk(top.values, top.indices, st.latents)
    with pytest.raises(ValueError, match="pass their keep_share"):
        det.detect_picked(picked, st, torch.ones(2, 6, 5))


def test_keep_concepts_are_checked():
    d = ConceptDictionary.from_latents([1], 12, name="circle")
    with pytest.raises(ValueError, match=r"\['circle'\] both detected and kept"):
        ConceptDetector(d, keep=ConceptDictionary.from_latents([2], 12, name="circle"))
    with pytest.raises(ValueError, match="different widths"):
        ConceptDetector(d, keep=ConceptDictionary.from_latents([2], 16, name="square"))
    with pytest.raises(KeyError):
        ConceptDetector(d, keep=[(ConceptDictionary.from_latents([2], 12, name="square"), ["cube"])])
