"""Prompt adherence logic, checked with an oracle labeller that returns the generator's own label maps."""

import pytest

from shapes_world.scenes import BACKGROUNDS, COLOURS, SHAPES, generate_scenes
from shapes_world.score import prompt_adherence


class Oracle:
    def __init__(self, scenes):
        self.scenes = scenes

    def label(self, images):
        return self.scenes.shape_map, self.scenes.colour_map


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(48, seed=31)


def test_true_captions_adhere_fully(scenes):
    got = prompt_adherence(Oracle(scenes), scenes.images, scenes.captions)
    assert got.objects_drawn == 1.0 and got.all_objects == 1.0 and got.exact == 1.0
    assert got.extra_colour == 0.0 and got.background_right == 1.0


def test_counts_against_a_hand_computed_answer(scenes):
    # Image 0 labelled with a caption of one object it has and one it lacks.
    i = 0
    c, s = int(scenes.colour_ids[i, 0]), int(scenes.shape_ids[i, 0])
    other_colour = next(k for k in range(len(COLOURS)) if k not in scenes.colour_ids[i].tolist())
    caption = (f"a {COLOURS[c]} {SHAPES[s]} and a {COLOURS[other_colour]} {SHAPES[s]} "
               f"on a {BACKGROUNDS[int(scenes.background_ids[i])]} background")
    one = scenes._replace(shape_map=scenes.shape_map[:1], colour_map=scenes.colour_map[:1])
    got = prompt_adherence(Oracle(one), scenes.images[:1], [caption])
    n_present = int((scenes.shape_ids[i] >= 0).sum())
    assert got.objects_drawn == 0.5 and got.colours_drawn == 0.5 and got.all_objects == 0.0
    assert got.extra_colour == (1.0 if n_present > 1 else 0.0)
    assert got.background_right == 1.0 and got.exact == 0.0


def test_wrong_background_is_caught(scenes):
    caps = [c.replace("on a black", "on a XX").replace("on a white", "on a black").replace("on a XX", "on a white")
            for c in scenes.captions]
    got = prompt_adherence(Oracle(scenes), scenes.images, caps)
    grey = sum(" grey " in c for c in scenes.captions) / len(caps)
    assert got.background_right == pytest.approx(grey)


def test_rejects_count_mismatch(scenes):
    with pytest.raises(ValueError, match="48 images but 2 captions"):
        prompt_adherence(Oracle(scenes), scenes.images, scenes.captions[:2])
