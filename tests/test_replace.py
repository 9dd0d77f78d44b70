"""PER on the planted set: no planted component left, outside bit-identical, sources from the same map."""

import pytest
import torch
from einops import rearrange
from planted import planted_maps, planted_sae

from sae_core.replace import replace_patches

GRIDS = [(5, 7), (6, 4), (3, 11)]


def planted_values(H, W, B=4):
    _, u = planted_sae()
    pm = planted_maps(B, H, W, u)
    return rearrange(pm.block_out, "b c h w -> b h w c"), pm.region, u


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("mode", ["random", "nearest", "mean"])
def test_no_planted_component_left_and_outside_bit_identical(hw, mode):
    x, region, u = planted_values(*hw)
    r = replace_patches(x, region, mode, torch.Generator().manual_seed(0))
    assert torch.equal(r.values[~region], x[~region])
    assert (r.values[region] @ u).abs().max() < 1e-5  # background is orthogonal to u
    assert (x[region] @ u).abs().min() >= 2.0 - 1e-5  # ... and the test could fail
    assert not r.all_detected.any()


@pytest.mark.parametrize("hw", GRIDS)
def test_random_sources_come_from_undetected_patches_of_the_same_map(hw):
    x, region, _ = planted_values(*hw)
    r = replace_patches(x, region, "random", torch.Generator().manual_seed(1))
    B = x.shape[0]
    for b in range(B):
        pool = x[b][~region[b]]  # [n_src, C]
        for v in r.values[b][region[b]]:
            assert (pool == v).all(-1).any(), "a replacement vector was not copied from a non-detected patch of this map"
        others = torch.cat([x[o][~region[o]] for o in range(B) if o != b])
        # vectors from other maps never appear (all background vectors are distinct random draws)
        for v in r.values[b][region[b]]:
            assert not (others == v).all(-1).any()


def test_random_is_seeded():
    x, region, _ = planted_values(6, 5)
    a = replace_patches(x, region, "random", torch.Generator().manual_seed(3)).values
    b = replace_patches(x, region, "random", torch.Generator().manual_seed(3)).values
    c = replace_patches(x, region, "random", torch.Generator().manual_seed(4)).values
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("hw", GRIDS)
def test_nearest_matches_brute_force(hw):
    x, region, _ = planted_values(*hw)
    r = replace_patches(x, region, "nearest")
    B, H, W, _ = x.shape
    for b in range(B):
        srcs = [(i, j) for i in range(H) for j in range(W) if not region[b, i, j]]
        for i in range(H):
            for j in range(W):
                if region[b, i, j]:
                    best = min(srcs, key=lambda s: ((s[0] - i) ** 2 + (s[1] - j) ** 2, s[0] * W + s[1]))
                    assert torch.equal(r.values[b, i, j], x[b, best[0], best[1]])


@pytest.mark.parametrize("hw", GRIDS)
def test_mean_matches_reference(hw):
    x, region, _ = planted_values(*hw)
    r = replace_patches(x, region, "mean")
    for b in range(x.shape[0]):
        ref = x[b][~region[b]].double().mean(0).float()
        torch.testing.assert_close(r.values[b][region[b]], ref.expand(int(region[b].sum()), -1))


def test_empty_mask_returns_the_same_tensor():
    x, region, _ = planted_values(5, 7)
    r = replace_patches(x, torch.zeros_like(region), "random")
    assert r.values is x and not r.all_detected.any()


def test_full_mask_is_unchanged_and_reported():
    x, region, _ = planted_values(5, 7, B=3)
    mask = region.clone()
    mask[1] = True
    r = replace_patches(x, mask, "random", torch.Generator().manual_seed(0))
    assert r.all_detected.tolist() == [False, True, False]
    assert torch.equal(r.values[1], x[1])
    assert not torch.equal(r.values[0], x[0])
    everything = replace_patches(x, torch.ones_like(mask), "nearest")
    assert everything.values is x and everything.all_detected.all()


def test_bad_inputs():
    x, region, _ = planted_values(5, 7)
    with pytest.raises(ValueError, match="replacement mode is 'copy', expected one of"):
        replace_patches(x, region, "copy")
    with pytest.raises(ValueError, match=r"mask \(4, 7, 5\) must be \[B, H, W\]"):
        replace_patches(x, region.transpose(1, 2), "random")
