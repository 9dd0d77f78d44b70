"""Frontend payloads of Mask Preview and Compare: files written, values in the PNGs, the contract's keys."""

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.ui_payload import COMPARE_KEY, MASK_KEY, compare_payload, mask_step_payload


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("grid", [(3, 5), (4, 2)])
def test_mask_steps_written_per_image_and_step(tmp_path, gen, grid):
    images = torch.rand(2, 24, 40, 3, generator=gen)
    maps0 = (torch.rand(3, *grid, generator=gen) > 0.5).float()
    maps1 = torch.rand(2, *grid, generator=gen)
    out = mask_step_payload(images, [([0, 1, 2], maps0), ([4, 7], maps1)], (1.0, 0.5, 0.0), 0.6, "cond", "mask",
                            str(tmp_path), subfolder="sub")
    entries = out[MASK_KEY]
    assert [e["image"] for e in entries] == [0, 1]
    assert entries[0]["steps"] == [0, 1, 2] and entries[1]["steps"] == [4, 7]
    assert entries[1]["grid"] == list(grid) and (entries[1]["width"], entries[1]["height"]) == (40, 24)
    assert entries[0]["truncated"] is False
    for i, maps in ((0, maps0), (1, maps1)):
        e = entries[i]
        base = np.asarray(Image.open(tmp_path / "sub" / e["base"]["filename"]))
        expected = (images[i].numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(base, expected)
        assert len(e["masks"]) == maps.shape[0]
        for s, ref in enumerate(e["masks"]):
            assert ref["subfolder"] == "sub" and ref["type"] == "temp"
            rgba = np.asarray(Image.open(tmp_path / "sub" / ref["filename"]))
            assert rgba.shape == (*grid, 4)
            np.testing.assert_array_equal(rgba[..., :3], np.broadcast_to([255, 128, 0], (*grid, 3)))
            np.testing.assert_array_equal(rgba[..., 3], np.round(maps[s].numpy() * 0.6 * 255).astype(np.uint8))


def test_mask_steps_truncated(tmp_path, monkeypatch):
    import nodes.ui_payload as up

    monkeypatch.setattr(up, "MAX_STEPS", 2)
    out = mask_step_payload(torch.zeros(1, 8, 8, 3), [([0, 1, 2], torch.zeros(3, 2, 2))], (1, 0, 0), 0.5, "cond",
                            "mask", str(tmp_path))
    e = out[MASK_KEY][0]
    assert e["truncated"] is True and e["steps"] == [0, 1] and len(e["masks"]) == 2


def test_mask_steps_wrong_count(tmp_path):
    with pytest.raises(ValueError, match="1 recorded map sets for 2 images"):
        mask_step_payload(torch.zeros(2, 8, 8, 3), [([0], torch.zeros(1, 2, 2))], (1, 0, 0), 0.5, "cond", "mask",
                          str(tmp_path))


def test_mask_steps_bad_maps(tmp_path):
    with pytest.raises(ValueError, match=r"maps of shape \(2, 2, 2\) for 3 steps"):
        mask_step_payload(torch.zeros(1, 8, 8, 3), [([0, 1, 2], torch.zeros(2, 2, 2))], (1, 0, 0), 0.5, "cond",
                          "mask", str(tmp_path))


def test_mask_steps_bad_opacity(tmp_path):
    with pytest.raises(ValueError, match="opacity is 1.5, expected 0..1"):
        mask_step_payload(torch.zeros(1, 8, 8, 3), [([0], torch.zeros(1, 2, 2))], (1, 0, 0), 1.5, "cond", "mask",
                          str(tmp_path))


def test_compare_payload(tmp_path, gen):
    a, b = torch.rand(2, 10, 12, 3, generator=gen), torch.rand(1, 10, 12, 3, generator=gen)
    full = compare_payload([a, b], ["original", "PER"], str(tmp_path))
    out = full[COMPARE_KEY]
    assert [o["label"] for o in out] == ["original", "PER"]
    # the newer frontends' core compare widget reads these keys: before = first branch, after = second
    assert full["a_images"] == [out[0]["image"]] and full["b_images"] == [out[1]["image"]]
    for o, img in zip(out, (a, b), strict=True):
        assert (o["width"], o["height"]) == (12, 10)
        got = np.asarray(Image.open(tmp_path / o["image"]["filename"]))
        np.testing.assert_array_equal(got, (img[0].numpy() * 255).round().astype(np.uint8))


def test_compare_payload_needs_two(tmp_path):
    with pytest.raises(ValueError, match="1 images and 1 labels; expected two or three"):
        compare_payload([torch.zeros(1, 4, 4, 3)], ["a"], str(tmp_path))
