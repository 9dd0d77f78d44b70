"""dit_hooks on tiny diffusers FLUX and SD3 transformers (random weights): masks equal an independent detection,
PER keeps undetected tokens bit-identical, the text stream is never touched, identity settings are exact, no
hook survives the with block, non-square grids."""

import pytest
import torch

from sae_core import SAEConfig, SparseAutoencoder
from sae_core.concepts import ConceptDictionary
from sae_core.detect import ConceptDetector
from sae_core.dit_hooks import attach_dit_interventions, dit_family
from sae_core.errors import SAEError
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from sae_core.torch_hooks import StepHolder, track_timestep

diffusers = pytest.importorskip("diffusers")

D = 32  # tiny hidden width: 2 heads x 16
TXT = 6


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=D,
                                 pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16).eval()


def flux_call(model, gh, gw, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :]
    kw = dict(hidden_states=torch.randn(batch, gh * gw, 16, generator=g),
              encoder_hidden_states=torch.randn(batch, TXT, 24, generator=g),
              pooled_projections=torch.randn(batch, 12, generator=g), timestep=torch.full((batch,), 0.7),
              img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TXT, 3), return_dict=False)
    return lambda: model(**kw)[0]


def sd3_call(model, lh, lw, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(batch, 4, lh, lw, generator=g),
              encoder_hidden_states=torch.randn(batch, TXT, 24, generator=g),
              pooled_projections=torch.randn(batch, 12, generator=g), timestep=torch.full((batch,), 700.0),
              return_dict=False)
    return lambda: model(**kw)[0]


def make_sae(M=96, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(M, D, generator=g)
    cfg = SAEConfig(d_in=D, n_latents=M, k=k, activation="relu_topk")
    return SparseAutoencoder(cfg, W_enc=torch.randn(M, D, generator=g) / D**0.5, b_enc=torch.randn(M, generator=g) * 0.1,
                             W_dec=W_dec / W_dec.norm(dim=-1, keepdim=True), b_dec=torch.zeros(D))


class Capture:
    """A plain forward hook registered before ours: the block's untouched (text, image) output."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(lambda m, a, o: self.calls.append((o[0], o[1].detach().clone())))


def ref_mask(sae, tokens, gh, gw, ids):
    codes = sae.encode(tokens[:, :gh * gw])  # [B, N, M]
    fire = torch.zeros(codes.shape[:2], dtype=torch.bool)
    for i in ids:
        fire |= codes[..., i] > 0
    return fire.reshape(-1, gh, gw)


def busy(sae, tokens, n=2):
    share = (sae.encode(tokens) > 0).float().flatten(0, 1).mean(0)
    return [int(i) for i in torch.argsort((share - 0.3).abs())[:n]]


CASES = [("flux", "transformer_blocks.1", (3, 5), (0,)), ("flux", "single_transformer_blocks.0", (4, 2), (0,)),
         ("sd3", "transformer_blocks.0", (3, 4), (1, 0)), ("sd3", "joint_blocks.1", (2, 5), (1, 0))]


@pytest.mark.parametrize("family,name,grid,chunks", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("mode", ["random", "nearest", "mean"])
def test_per_on_dit_blocks(family, name, grid, chunks, mode):
    model = tiny_flux() if family == "flux" else tiny_sd3()
    assert dit_family(model) == family
    gh, gw = grid
    call = flux_call(model, gh, gw) if family == "flux" else sd3_call(model, 2 * gh + 1, 2 * gw)  # odd: the last row is dropped
    block = dict(model.named_modules())[name.replace("joint_blocks", "transformer_blocks")]
    cap = Capture(block)
    with torch.no_grad():
        base = call()
    sae = make_sae()
    ids = busy(sae, cap.calls[0][1])
    det = ConceptDetector(ConceptDictionary.from_latents(ids, sae.cfg.n_latents, threshold=0.0), sae=sae)
    rec = Recorder()
    iv = BlockIntervention(sae, det, ReplaceSettings(mode=mode, seed=1), recorder=rec, label=name)
    holder = StepHolder()
    cap.calls.clear()
    seen = []
    with torch.no_grad(), track_timestep(model, holder, chunks=chunks), attach_dit_interventions(
            model, {name: iv}, holder):
        after = block.register_forward_hook(lambda m, a, o: seen.append(o))  # after ours: sees our output
        out = call()
        after.remove()
    cap.handle.remove()
    assert not torch.equal(out, base)
    (txt_in, img_in), (txt_out, img_out) = cap.calls[0], seen[0]
    assert txt_out is txt_in
    mask = ref_mask(sae, img_in, gh, gw, ids)
    assert 0 < float(mask.float().mean()) < 1
    n = img_in.shape[0] // len(chunks)
    for c, flag in enumerate(chunks):
        keys, masks = rec.masks("cond" if flag == 0 else "uncond", 0)
        torch.testing.assert_close(masks[0], mask[c * n])
    g_in, g_out = img_in.reshape(-1, gh, gw, D), img_out.reshape(-1, gh, gw, D)
    assert torch.equal(g_out[~mask], g_in[~mask])  # PER: undetected tokens bit-identical
    if mode != "mean":  # copies of undetected tokens of the same map
        for r in range(g_in.shape[0]):
            sources = g_in[r][~mask[r]]
            for y, x in mask[r].nonzero().tolist():
                assert (sources == g_out[r, y, x]).all(-1).any()
    assert holder().timestep == pytest.approx(0.7 if family == "flux" else 700.0)


def test_text_stream_and_untouched_tokens_through_the_hook():
    """What the hook hands on: text stream the same object, image tokens bit-identical where undetected."""
    model = tiny_flux()
    gh, gw = 3, 5
    call = flux_call(model, gh, gw, batch=2)
    block = model.single_transformer_blocks[0]
    seen = []
    sae = make_sae()
    with torch.no_grad():
        first = Capture(block)
        call()
        first.handle.remove()
    ids = busy(sae, first.calls[0][1])
    det = ConceptDetector(ConceptDictionary.from_latents(ids, sae.cfg.n_latents, threshold=0.0), sae=sae)
    iv = BlockIntervention(sae, det, ReplaceSettings(seed=0), recorder=Recorder())
    inner = Capture(block)  # registered before ours: runs first
    with torch.no_grad(), attach_dit_interventions(model, {"single.0": iv}, StepHolder(StepInfo(0.7))):
        after = block.register_forward_hook(lambda m, a, o: seen.append(o))  # registered after ours: sees our output
        call()
        after.remove()
    (txt_in, img_in), (txt_out, img_out) = inner.calls[0], seen[0]
    assert txt_out is txt_in  # the text stream is handed on untouched
    mask = ref_mask(sae, img_in, gh, gw, ids).reshape(2, -1)
    assert mask.any() and not mask.all()
    assert torch.equal(img_out[~mask], img_in[~mask]) and not torch.equal(img_out[mask], img_in[mask])


def test_identity_is_bit_identical_and_hooks_are_removed():
    model = tiny_sd3()
    call = sd3_call(model, 6, 10)
    with torch.no_grad():
        base = call()
    sae = make_sae()
    nothing = ConceptDetector(ConceptDictionary.from_latents([1, 2], sae.cfg.n_latents, threshold=1e6), sae=sae)
    rec = Recorder()
    iv = BlockIntervention(sae, nothing, ReplaceSettings(), recorder=rec)
    with torch.no_grad(), attach_dit_interventions(model, {"transformer_blocks.1": iv},
                                                   StepHolder(StepInfo(700.0, chunks=(1, 0)))):
        assert torch.equal(call(), base)
    assert rec.records and rec.records[0].hw == (3, 5)

    def hooks_left():
        return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    assert not hooks_left()
    with pytest.raises(RuntimeError, match="boom"):
        with attach_dit_interventions(model, {"transformer_blocks.0": iv}, StepHolder(StepInfo(700.0))):
            raise RuntimeError("boom")
    assert not hooks_left()
    with pytest.raises(SAEError, match="not a hookable block of sd3"):
        with attach_dit_interventions(model, {"single_transformer_blocks.0": iv}, StepHolder(StepInfo(1.0))):
            pass
    with pytest.raises(SAEError, match="no block transformer_blocks.5"):
        with attach_dit_interventions(model, {"transformer_blocks.5": iv}, StepHolder(StepInfo(1.0))):
            pass
    assert not hooks_left()
    with torch.no_grad():
        assert torch.equal(call(), base)
