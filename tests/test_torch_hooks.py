"""torch_hooks: interventions on named submodules of any nn.Module; no hook survives the with block."""

import dataclasses

import pytest
import torch
from planted import planted_maps, planted_sae
from torch import nn

from sae_core.concepts import ConceptDictionary
from sae_core.detect import ConceptDetector
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from sae_core.torch_hooks import StepHolder, attach_interventions, track_timestep


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "_forward_hooks_with_kwargs", {})
               for m in model.modules())


@dataclasses.dataclass
class Out:
    sample: torch.Tensor


class Block(nn.Module):
    """Adds a fixed residual; returns a tensor, a tuple or a dataclass, like the many diffusers blocks."""

    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        self.register_buffer("bias", torch.zeros(1, d, 1, 1))

    def forward(self, hidden_states, scale=1.0, return_dict=True):
        y = hidden_states + self.bias * scale
        if self.kind == "tensor":
            return y
        if self.kind == "tuple":
            return (y, "extra")
        return Out(sample=y)


class Net(nn.Module):
    def __init__(self, kind, d):
        super().__init__()
        self.blocks = nn.ModuleList([Block(kind, d)])

    def forward(self, x, as_kwarg=False):
        out = self.blocks[0](hidden_states=x) if as_kwarg else self.blocks[0](x)
        return out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, tuple) else out.sample)


def per_setup(chunks=(1, 0)):
    sae, u = planted_sae()
    pm = planted_maps(2 * len(chunks), 5, 7, u)
    det = ConceptDetector(ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0), sae=sae)
    return sae, u, pm, det


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dataclass"])
@pytest.mark.parametrize("as_kwarg", [False, True])
def test_hooks_edit_every_output_kind_and_are_removed(kind, as_kwarg):
    sae, u, pm, det = per_setup()
    net = Net(kind, 16)
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings(seed=0), recorder=rec, label="blocks.0")
    holder = StepHolder(StepInfo(500.0, chunks=(1, 0), step_index=0))
    with attach_interventions(net, {"blocks.0": iv}, holder):
        y = net(pm.block_out, as_kwarg=as_kwarg)
    direct = iv(pm.block_out, pm.block_out, holder())
    assert torch.equal(y, direct) and not torch.equal(y, pm.block_out)
    assert len(rec.records) == 2 * 4  # two calls (hooked and direct), 2 chunks x 2 images each
    assert no_hooks_left(net)
    assert torch.equal(net(pm.block_out, as_kwarg=as_kwarg), pm.block_out)


def test_hooks_are_removed_after_an_exception():
    sae, u, pm, det = per_setup()
    net = Net("tensor", 16)
    iv = BlockIntervention(sae, det, ReplaceSettings())
    with pytest.raises(RuntimeError, match="no step set"):
        with attach_interventions(net, {"blocks.0": iv}, StepHolder()):
            net(pm.block_out)
    assert no_hooks_left(net)


def test_unknown_module_name_is_reported_with_close_names():
    sae, u, pm, det = per_setup()
    net = Net("tensor", 16)
    with pytest.raises(KeyError, match=r"no submodule\(s\) \['block.0'\].*'blocks.0'"):
        with attach_interventions(net, {"block.0": BlockIntervention(sae, det)}, StepHolder()):
            pass
    assert no_hooks_left(net)


def test_chained_interventions_on_one_module_apply_in_order():
    sae, u, pm, det = per_setup()
    net = Net("tuple", 16)
    a = BlockIntervention(sae, det, ReplaceSettings(seed=1), label="a")
    rec = Recorder()
    b = BlockIntervention(sae, det, None, recorder=rec, label="b")  # sees a's output: nothing left to detect
    step = StepInfo(10.0, chunks=(1, 0))
    with attach_interventions(net, {"blocks.0": [a, b]}, lambda: step):
        net(pm.block_out)
    assert not torch.stack([r.mask() for r in rec.records]).any()
    assert no_hooks_left(net)


def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
    ).eval()


def test_real_diffusers_unet_non_square_cfg_batch():
    unet = tiny_unet()
    name = "up_blocks.1.attentions.0"
    sae, _ = planted_sae(d=32, M=40)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 12, generator=g)  # diffusers CFG batch: [uncond, cond]
    text = torch.randn(2, 5, 16, generator=g)
    holder = StepHolder()

    def run():
        with torch.no_grad():
            return unet(latents, 500, encoder_hidden_states=text).sample

    base = run()
    # pass 1: detection only, to learn a threshold that splits the map; output must be untouched
    rec = Recorder()
    probe = BlockIntervention(sae, ConceptDetector(ConceptDictionary.from_latents([0], 40, threshold=0.0)), None,
                              recorder=rec, label=name)
    holder.set(StepInfo(500.0, chunks=(1, 0), step_index=0))
    with attach_interventions(unet, {name: probe}, holder):
        same = run()
    assert torch.equal(same, base) and no_hooks_left(unet)
    assert [(r.branch, r.hw) for r in rec.records] == [("uncond", (8, 12)), ("cond", (8, 12))]
    scores = torch.stack([r.score.float() for r in rec.records])
    tau = float(scores.median())
    # pass 2: PER on the cond branch only, with that threshold
    rec2 = Recorder()
    det = ConceptDetector(ConceptDictionary.from_latents([0], 40, threshold=tau))
    per = BlockIntervention(sae, det, ReplaceSettings(seed=0), branches="cond", recorder=rec2, label=name)
    seen = {}

    def grab(module, args, kwargs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output.sample

    module = dict(unet.named_modules())[name]
    h = module.register_forward_hook(grab, with_kwargs=True)  # registered first: sees the unedited output
    try:
        with attach_interventions(unet, {name: per}, holder):
            edited = run()
    finally:
        h.remove()
    assert no_hooks_left(unet)
    m = rec2.records[0].mask()
    assert rec2.records[0].branch == "cond" and 0 < int(m.sum()) < 96
    assert not torch.equal(edited, base)
    # the hooked block output, edited directly, is what the UNet continued with
    direct = per(None, seen["out"], holder())
    assert not torch.equal(direct, seen["out"]) and torch.equal(direct[0], seen["out"][0])  # uncond untouched
    assert torch.equal(run(), base)  # and the UNet is back to normal


def test_track_timestep_on_a_diffusers_unet_keys_records_by_step():
    unet = tiny_unet()
    name = "up_blocks.1.attentions.1"
    sae, _ = planted_sae(d=32, M=40)
    rec = Recorder()
    iv = BlockIntervention(sae, ConceptDetector(ConceptDictionary.from_latents([0], 40)), None, recorder=rec, label=name)
    holder = StepHolder()
    schedule = [999, 666, 333, 1]
    latents = torch.randn(1, 4, 8, 6)
    text = torch.randn(1, 5, 16)
    with track_timestep(unet, holder, chunks=(0,), schedule=schedule), attach_interventions(unet, {name: iv}, holder):
        with torch.no_grad():
            for t in (999, 333):
                unet(latents, torch.tensor([t]), encoder_hidden_states=text)
            unet(latents, timestep=1, encoder_hidden_states=text)
    assert rec.keys() == [0, 2, 3]
    assert [r.timestep for r in rec.records] == [999.0, 333.0, 1.0]
    assert no_hooks_left(unet)


def test_track_timestep_without_a_timestep_fails_clearly_and_unhooks():
    net = Net("tensor", 16)
    with pytest.raises(ValueError, match="called without a timestep"):
        with track_timestep(net, StepHolder()):
            net(torch.zeros(1, 16, 2, 2))
    assert no_hooks_left(net)
