"""Shapes-world UNet model: training reduces loss, DDIM+CFG sampler against a hand-written reference,
checkpoint save/load/resume and their errors."""

import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("diffusers")

from shapes_world.model import ModelConfig, ShapesModel, load_model, save_model  # noqa: E402
from shapes_world.sample import sample, to_grid  # noqa: E402
from shapes_world.text import TextEncoderConfig  # noqa: E402
from shapes_world.train import TrainConfig, loss_on_batch, lr_at, make_batch, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        sample_size=16, block_out_channels=(8, 16, 16), norm_num_groups=4, attention_heads=2,
        text=TextEncoderConfig(dim=16, layers=1, heads=2, max_length=20),
    )
    return ModelConfig(**(base | kw))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = ShapesModel(tiny_config()).eval()
    with torch.no_grad():  # diffusers zero-inits output convs; perturb so eps depends on the input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_unet_has_cross_attention_at_16_and_8_only():
    model = ShapesModel(ModelConfig())
    unet = model.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    grids = {}

    def record(name):
        def hook(module, args, out):
            grids[name] = tuple(out[0].shape[-2:])

        return hook

    hooks = [
        m.register_forward_hook(record(n))
        for n, m in unet.named_modules()
        if type(m).__name__ == "Transformer2DModel"
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32), torch.tensor([10]), model.encode_text(["a red circle"]))
    finally:
        for h in hooks:
            h.remove()
    assert grids == {
        "down_blocks.1.attentions.0": (16, 16), "down_blocks.2.attentions.0": (8, 8),
        "mid_block.attentions.0": (8, 8), "up_blocks.0.attentions.0": (8, 8), "up_blocks.0.attentions.1": (8, 8),
        "up_blocks.1.attentions.0": (16, 16), "up_blocks.1.attentions.1": (16, 16),
    }


def test_a_few_training_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ShapesModel(tiny_config()).train()
    sched = model.train_scheduler()
    tc = TrainConfig(batch=8, seed=3)
    x0, captions, _ = make_batch(0, tc, 16)

    def fixed_loss():
        return loss_on_batch(model, sched, x0, captions, torch.Generator().manual_seed(11), 5.0)

    with torch.no_grad():
        before = fixed_loss().item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = fixed_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_min_snr_loss_matches_reference(tiny_model, offset):
    sched = tiny_model.train_scheduler()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    caps = ["a red circle", "", "a blue square on a grey background", "a cyan cross"]
    with torch.no_grad():
        got = loss_on_batch(tiny_model, sched, x0, caps, torch.Generator().manual_seed(5), 5.0, offset)
        # Reference: replay the same draws and weight by min(snr, 5) / snr by hand.
        g = torch.Generator().manual_seed(5)
        t = torch.randint(1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if offset:  # one constant per image and channel, drawn after the pixel noise
            noise = noise + offset * torch.randn(4, 3, 1, 1, generator=g)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ab = torch.cumprod(1 - betas, 0).float()[t]
        x_t = ab.sqrt().view(4, 1, 1, 1) * x0 + (1 - ab).sqrt().view(4, 1, 1, 1) * noise
        pred = tiny_model.unet(x_t, t, encoder_hidden_states=tiny_model.encode_text(caps)).sample
        mse = ((pred - noise) ** 2).mean((1, 2, 3))
        snr = ab / (1 - ab)
        want = (mse * torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lr_schedule_values():
    tc = TrainConfig(steps=1100, lr=1e-3, warmup=100, min_lr_frac=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-5)
    assert lr_at(99, tc) == pytest.approx(1e-3)
    assert lr_at(600, tc) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(1100, tc) == pytest.approx(1e-4)
    # A spent time budget ends the decay early.
    assert lr_at(300, tc, time_frac=1.0) == pytest.approx(1e-4)


def test_make_batch_is_deterministic_and_drops_captions():
    tc = TrainConfig(batch=200, seed=4, cond_drop=0.1)
    a, caps_a, _ = make_batch(7, tc, 32)
    b, caps_b, _ = make_batch(7, tc, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert caps_a == caps_b
    n_empty = sum(c == "" for c in caps_a)
    assert 5 <= n_empty <= 40
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def _reference_ddim(model, captions, noise, steps, cfg):
    """DDIM (eta 0, trailing spacing, final alpha = alphas_cumprod[0]) with CFG, written out by hand."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0).float()
    ts = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]
    x = noise.clone()
    cond = model.encode_text(captions)
    uncond = model.encode_text([""] * len(captions))
    for t in ts:
        tt = torch.full((x.shape[0],), t)
        e_c = model.unet(x, tt, encoder_hidden_states=cond).sample
        e_u = model.unet(x, tt, encoder_hidden_states=uncond).sample
        eps = e_u + cfg * (e_c - e_u)
        a = ab[t]
        prev = t - 1000 // steps
        a_prev = ab[prev] if prev >= 0 else ab[0]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("steps,cfg", [(4, 3.0), (3, 1.5)])
def test_sampler_matches_reference_ddim(tiny_model, steps, cfg):
    caps = ["a red circle", "a blue square and a green cross on a black background", ""]
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = _reference_ddim(tiny_model, caps, noise, steps, cfg)
    got = sample(tiny_model, caps, steps=steps, cfg=cfg, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sampler_is_deterministic_per_seed_and_row_independent(tiny_model):
    caps = ["a red circle", "a yellow triangle on a white background"]
    a = sample(tiny_model, caps, seed=1, steps=3)
    b = sample(tiny_model, caps, seed=1, steps=3)
    c = sample(tiny_model, caps, seed=2, steps=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert a.shape == (2, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    # Swapping rows (captions with their noise) swaps the outputs: no cross-talk between rows.
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    swapped = sample(tiny_model, caps[::-1], steps=3, noise=noise.flip(0))
    torch.testing.assert_close(swapped.flip(0), a, rtol=1e-4, atol=1e-5)


def test_sampler_cfg_one_equals_conditional_only(tiny_model):
    caps = ["a purple square"]
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _reference_ddim(tiny_model, caps, noise, 2, 1.0)
    torch.testing.assert_close(sample(tiny_model, caps, steps=2, cfg=1.0, noise=noise), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [({"steps": 0}, "steps=0"), ({"captions": []}, "no captions"),
     ({"noise": torch.zeros(1, 3, 8, 8)}, r"noise has shape \(1, 3, 8, 8\), expected \(1, 3, 16, 16\)")],
)
def test_sampler_rejects_bad_input(tiny_model, kwargs, fragment):
    args = {"captions": ["a red circle"]} | kwargs
    with pytest.raises(ValueError, match=fragment):
        sample(tiny_model, **args)


def test_to_grid_layout():
    imgs = torch.zeros(3, 3, 4, 4)
    imgs[1] = 1.0
    g = to_grid(imgs, rows=1, scale=2, pad=1)
    assert g.size == ((3 * 5 + 1) * 2, (5 + 1) * 2)
    assert g.getpixel((2 * 7, 2 * 2)) == (255, 255, 255) and g.getpixel((2 * 2, 2 * 2)) == (0, 0, 0)


def test_save_load_round_trip(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, {"step": 5})
    loaded, config = load_model(tmp_path)
    assert config["step"] == 5
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        sample(loaded, ["a red circle"], steps=2, noise=noise), sample(tiny_model, ["a red circle"], steps=2, noise=noise)
    )


def test_load_errors(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_model(tmp_path)
    save_model(tiny_model, tmp_path)
    cfg_path = tmp_path / "config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(good | {"format": "other"}))
    with pytest.raises(ValueError, match="format is 'other'"):
        load_model(tmp_path)
    cfg_path.write_text(json.dumps(good | {"vocab": ["x"]}))
    with pytest.raises(ValueError, match="vocabulary"):
        load_model(tmp_path)
    wrong = dict(good)
    wrong["model"] = tiny_config(block_out_channels=(8, 24, 24)).to_dict()  # same keys, other shapes
    cfg_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="has shape"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [({"block_out_channels": (8, 16)}, "three levels"), ({"block_out_channels": (8, 16, 18)}, "18 must be divisible")],
)
def test_model_config_validates(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_config(**kwargs)


def test_model_config_round_trip():
    cfg = tiny_config()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_train_writes_checkpoints_and_resumes(tmp_path):
    mc = tiny_config()
    tc = TrainConfig(steps=3, batch=4, warmup=1)
    train(tmp_path, mc, tc, None, log_every=1, save_minutes=100, snapshot_every=2)
    assert (tmp_path / "step_000002" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["step"] == 3
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    model, _ = load_model(tmp_path / "latest")
    assert model.cfg == mc


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(tmp_path):
    mc, tc = tiny_config(), TrainConfig(steps=4, batch=4, warmup=1)
    # A zero time budget stops (after saving) right after the first step; the rerun resumes to step 4.
    train(tmp_path / "a", mc, tc, 0.0, 1, 100, 100)
    assert torch.load(tmp_path / "a" / "latest" / "train_state.pt", weights_only=True)["step"] == 1
    train(tmp_path / "a", mc, tc, None, 1, 100, 100)
    train(tmp_path / "b", mc, tc, None, 1, 100, 100)
    resumed = torch.load(tmp_path / "a" / "latest" / "train_state.pt", weights_only=True)
    fresh = torch.load(tmp_path / "b" / "latest" / "train_state.pt", weights_only=True)
    assert resumed["step"] == fresh["step"] == 4
    for part in ("model", "ema"):
        for k in fresh[part]:
            torch.testing.assert_close(resumed[part][k], fresh[part][k], rtol=1e-5, atol=1e-6)


def test_resume_with_other_model_config_is_refused(tmp_path):
    train(tmp_path, tiny_config(), TrainConfig(steps=1, batch=2, warmup=1), None, 1, 100, 100)
    with pytest.raises(ValueError, match="saved model config"):
        train(tmp_path, tiny_config(layers_per_block=2), TrainConfig(steps=2, batch=2), None, 1, 100, 100)


def test_export_fp16_round_trip(tiny_model, tmp_path):
    from shapes_world.export import export

    save_model(tiny_model, tmp_path / "src", {"step": 7, "train": {"seed": 3}})
    export(tmp_path / "src", tmp_path / "dst")
    loaded, config = load_model(tmp_path / "dst")
    assert config["step"] == 7 and config["train"] == {"seed": 3} and config["dtype"] == "float16"
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), rtol=0, atol=0)


SHIPPED = pathlib.Path(__file__).resolve().parents[1] / "shapes_world" / "weights"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped shapes-world model")
def test_shipped_model_draws_the_named_colour():
    from shapes_world.evaluator import load_evaluator
    from shapes_world.score import prompt_adherence

    model, _ = load_model(SHIPPED)
    caps = ["a red circle on a black background", "a blue square on a white background",
            "a yellow triangle on a grey background", "a green cross on a grey background"]
    images = sample(model, caps, seed=0, steps=20, cfg=3.0)
    torch.testing.assert_close(images, sample(model, caps, seed=0, steps=20, cfg=3.0), rtol=0, atol=0)
    got = prompt_adherence(load_evaluator(), images, caps)
    assert got.colours_drawn >= 0.75 and got.extra_colour <= 0.25
