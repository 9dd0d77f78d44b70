"""Per-pixel evaluator: forward shapes, errors, save/load, learning, and the shipped weights' accuracy."""

import json

import pytest
import torch
import torch.nn.functional as F

from shapes_world.evaluator import (
    DEFAULT_DIR,
    N_COLOUR,
    N_SHAPE,
    EvaluatorConfig,
    PixelEvaluator,
    augment,
    evaluate,
    load_evaluator,
    save_evaluator,
)
from shapes_world.scenes import generate_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("h,w", [(32, 32), (16, 24)])
def test_forward_shapes(h, w):
    model = PixelEvaluator(EvaluatorConfig(width=8, groups=4)).eval()
    out = model(torch.rand(2, 3, h, w))
    assert out.shape_logits.shape == (2, N_SHAPE, h, w)
    assert out.colour_logits.shape == (2, N_COLOUR, h, w)
    shape_map, colour_map = model.label(torch.rand(2, 3, h, w))
    assert shape_map.shape == (2, h, w) and int(shape_map.max()) < N_SHAPE and int(colour_map.max()) < N_COLOUR


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 30, 32), (3, 32, 32)])
def test_forward_rejects_bad_images(shape):
    with pytest.raises(ValueError, match="expected \\[B, 3, H, W\\]"):
        PixelEvaluator(EvaluatorConfig(width=8, groups=4))(torch.rand(shape))


def test_a_few_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = PixelEvaluator(EvaluatorConfig(width=8, groups=4))
    s = generate_scenes(16, seed=2)

    def loss():
        out = model(s.images)
        return F.cross_entropy(out.shape_logits, s.shape_map) + F.cross_entropy(out.colour_logits, s.colour_map)

    before = loss().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        val = loss()
        opt.zero_grad()
        val.backward()
        opt.step()
    assert loss().item() < 0.5 * before


def test_augment_is_seeded_and_in_range():
    x = torch.rand(4, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and not torch.equal(a, x)


def test_save_load_round_trip(tmp_path):
    model = PixelEvaluator(EvaluatorConfig(width=8, groups=4)).eval()
    save_evaluator(model, tmp_path, {"note": "x"})
    loaded = load_evaluator(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).shape_logits, model(x).shape_logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluator.json: missing"):
        load_evaluator(tmp_path)
    save_evaluator(PixelEvaluator(EvaluatorConfig(width=8, groups=4)), tmp_path)
    info_path = tmp_path / "evaluator.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(info | {"colours": ["red"]}))
    with pytest.raises(ValueError, match="retrain the evaluator"):
        load_evaluator(tmp_path)
    info_path.write_text(json.dumps(info | {"config": {"width": 16, "groups": 4}}))
    with pytest.raises(ValueError, match="has shape"):
        load_evaluator(tmp_path)


@pytest.mark.skipif(not (DEFAULT_DIR / "evaluator.safetensors").is_file(), reason="no shipped evaluator weights")
def test_shipped_evaluator_reads_held_out_scenes():
    acc = evaluate(load_evaluator(), n=64)
    assert acc.shape_pixel > 0.97 and acc.colour_pixel > 0.97
    assert acc.both_foreground > 0.9
