"""Procedural scenes: pixels agree with masks and label maps, determinism, captions parse back."""

import math

import pytest
import torch

from shapes_world.scenes import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    MAX_OBJECTS,
    SHAPES,
    TEXTURES,
    caption_for,
    generate_scenes,
    parse_caption,
    shape_masks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(256, seed=123)


def test_shapes_and_dtypes(scenes):
    n = 256
    assert scenes.images.shape == (n, 3, 32, 32) and scenes.images.dtype == torch.float32
    assert scenes.masks.shape == (n, MAX_OBJECTS, 32, 32) and scenes.masks.dtype == torch.bool
    assert scenes.shape_map.shape == scenes.colour_map.shape == (n, 32, 32)
    assert len(scenes.captions) == n
    assert float(scenes.images.min()) >= 0.0 and float(scenes.images.max()) <= 1.0


def test_deterministic_and_seed_sensitive():
    a, b, c = generate_scenes(64, seed=7), generate_scenes(64, seed=7), generate_scenes(64, seed=8)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert a.captions == b.captions
    assert torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_all_object_counts_and_words_occur(scenes):
    counts = (scenes.shape_ids >= 0).sum(1)
    assert set(counts.tolist()) == {1, 2, 3}
    assert set(scenes.shape_ids[scenes.shape_ids >= 0].tolist()) == set(range(len(SHAPES)))
    assert set(scenes.colour_ids[scenes.colour_ids >= 0].tolist()) == set(range(len(COLOURS)))
    assert set(scenes.background_ids.tolist()) == set(range(len(BACKGROUNDS)))
    assert set(scenes.texture_ids.tolist()) == set(range(len(TEXTURES)))


def test_masks_are_disjoint_nonempty_and_match_label_maps(scenes):
    present = scenes.shape_ids >= 0
    area = scenes.masks.sum((2, 3))
    assert bool((area[present] > 0).all()), "every present object has visible pixels"
    assert bool((area[~present] == 0).all()), "empty slots have empty masks"
    assert int(scenes.masks.sum(1).max()) <= 1, "object masks do not overlap"
    # Rebuild the label maps from the masks and the object ids, independently of the generator.
    shape_ref = torch.zeros_like(scenes.shape_map)
    colour_ref = torch.zeros_like(scenes.colour_map)
    for i in range(scenes.masks.shape[0]):
        for j in range(MAX_OBJECTS):
            m = scenes.masks[i, j]
            shape_ref[i][m] = int(scenes.shape_ids[i, j]) + 1
            colour_ref[i][m] = int(scenes.colour_ids[i, j]) + 1
    assert torch.equal(shape_ref, scenes.shape_map)
    assert torch.equal(colour_ref, scenes.colour_map)


def test_pixels_match_masks(scenes):
    # Object pixels are one flat colour near the nominal one; background pixels are grey.
    for i in range(64):
        img = scenes.images[i]
        for j in range(MAX_OBJECTS):
            m = scenes.masks[i, j]
            if not m.any():
                continue
            px = img[:, m]  # [3, N]
            assert float((px - px[:, :1]).abs().max()) == 0.0, "an object is drawn in one flat colour"
            nominal = COLOUR_RGB[int(scenes.colour_ids[i, j])]
            assert float((px[:, 0] - nominal).abs().max()) <= 0.05 + 1e-6
        bg = img[:, ~scenes.masks[i].any(0)]
        assert float((bg[0] - bg[1]).abs().max()) == 0.0 and float((bg[1] - bg[2]).abs().max()) == 0.0


def _reference_shape(shape: str, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Pixel-by-pixel reference written without vectorisation."""
    out = torch.zeros(size, size, dtype=torch.bool)
    for row in range(size):
        for col in range(size):
            dx, dy = col + 0.5 - cx, row + 0.5 - cy
            if shape == "circle":
                inside = math.hypot(dx, dy) <= r
            elif shape == "square":
                inside = abs(dx) <= 0.8 * r and abs(dy) <= 0.8 * r
            elif shape == "triangle":
                inside = dy <= 0.75 * r and abs(dx) * 1.75 <= 0.95 * (dy + r)
            else:
                inside = (abs(dx) <= 0.9 * r and abs(dy) <= 0.32 * r) or (abs(dx) <= 0.32 * r and abs(dy) <= 0.9 * r)
            out[row, col] = inside
    return out


@pytest.mark.parametrize("shape_id", range(len(SHAPES)))
@pytest.mark.parametrize("cx,cy,r", [(10.3, 20.7, 5.5), (16.0, 9.2, 7.9)])
def test_shape_mask_against_reference(shape_id, cx, cy, r):
    got = shape_masks(torch.tensor(shape_id), torch.tensor([cx, cy]), torch.tensor(r), 32)
    assert torch.equal(got, _reference_shape(SHAPES[shape_id], cx, cy, r, 32))


def test_captions_parse_back_to_objects(scenes):
    for i, caption in enumerate(scenes.captions):
        parsed = parse_caption(caption)
        want = [
            (COLOURS[int(c)], SHAPES[int(s)])
            for s, c in zip(scenes.shape_ids[i], scenes.colour_ids[i], strict=True)
            if int(s) >= 0
        ]
        assert parsed.objects == want
        assert parsed.background == BACKGROUNDS[int(scenes.background_ids[i])]
        assert parsed.texture == TEXTURES[int(scenes.texture_ids[i])]


def test_objects_are_ordered_left_to_right(scenes):
    present = scenes.shape_ids >= 0
    x = scenes.centres[..., 0]
    both = present[:, 1:] & present[:, :-1]
    assert bool((x[:, 1:] >= x[:, :-1])[both].all())
    # Present slots come first.
    assert bool((present[:, 1:] <= present[:, :-1]).all())


def test_caption_format():
    assert caption_for([0, 1, -1], [0, 2, -1], 1, 0) == "a red circle and a blue square on a grey background"
    assert caption_for([3, -1, -1], [5, -1, -1], 2, 1) == "a cyan cross on a white striped background"


def test_parse_caption_without_background():
    p = parse_caption("a red circle and a green triangle")
    assert p.objects == [("red", "circle"), ("green", "triangle")] and p.background is None


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ("a pink circle", "'a pink circle'"),
        ("a red hexagon on a grey background", "'a red hexagon'"),
        ("a red circle on a pink background", "background clause"),
        ("red circle", "'red circle'"),
    ],
)
def test_parse_caption_rejects_bad_captions(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_caption(bad)


@pytest.mark.parametrize("kwargs,fragment", [({"max_objects": 0}, "max_objects=0"), ({"n": 0}, "n=0")])
def test_generate_scenes_rejects_bad_arguments(kwargs, fragment):
    args = {"n": 4, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=fragment):
        generate_scenes(**args)


def test_max_objects_one_gives_single_objects():
    s = generate_scenes(64, seed=3, max_objects=1)
    assert bool(((s.shape_ids >= 0).sum(1) == 1).all())
