"""The nodes on tiny FLUX and SD3 models built with ComfyUI's own classes, through comfy.sample.

Around the node's patch sit two plain ``patches_replace["dit"]`` patches written here: the inner one (installed
first, so the node must chain it) records the block's untouched output sequence, the outer one (installed after)
records what the node returned. References (token -> grid layout, masks, PER's sources) are computed here.
"""

import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch
from test_nodes_comfyui import FakeClip, make_sae, ref_mask, typed_detector
from tiny_dits import POOLED, WIDTH, build_flux, build_sd3, dit_conds
from tiny_unets import sample


@pytest.fixture(scope="module")
def flux(comfy_threads):
    return build_flux()


@pytest.fixture(scope="module")
def flux_dev(comfy_threads):
    return build_flux(seed=21, guidance=True)


@pytest.fixture(scope="module")
def sd3(comfy_threads):
    return build_sd3()


def _tiny(request, name):
    return request.getfixturevalue(name)


def run(model, *, width=80, height=56, cfg=1.0, steps=2, batch=1, guidance=None, seed=7):
    pos, neg = dit_conds(guidance=guidance)
    return sample(model, "dit", width=width, height=height, cfg=cfg, steps=steps, batch=batch, positive=pos,
                  negative=neg, seed=seed)


class SeqRecorder:
    """A foreign replace patch: chains what was there before it (or the original block) and records the
    ``img`` sequence it returns and the call's cond_or_uncond."""

    def __init__(self, prev=None):
        self.prev, self.calls, self.inputs = prev, [], []

    def __deepcopy__(self, memo):  # model.clone() deep-copies model_options: keep one recorder
        return self

    def __call__(self, args, extra):
        x_in = args["img"].detach().clone()  # before the block: FLUX's single block adds to its input in place
        out = self.prev(args, extra) if self.prev is not None else extra["original_block"](args)
        to = args["transformer_options"]
        self.calls.append((out["img"].detach().clone(), out.get("txt"), tuple(to["cond_or_uncond"])))
        self.inputs.append(x_in)
        return out


def add_recorder(model, kind, index):
    m = model.clone()
    prev = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get((kind, index))
    rec = SeqRecorder(prev)
    m.set_model_patch_replace(rec, "dit", kind, index)
    return m, rec


def image_grid(seq, start, gh, gw):
    """[B, C, gh, gw] from the image tokens of a sequence (row-major patches, as FLUX / SD3 patchify)."""
    b, _, c = seq.shape
    return seq[:, start:start + gh * gw].reshape(b, gh, gw, c).permute(0, 3, 1, 2)


# (fixture, block name, ComfyUI key, patch kind, index, text tokens before the image tokens)
CASES = [
    ("flux", "transformer_blocks.1", "double_blocks.1", "double_block", 1, 0),
    ("flux", "single_transformer_blocks.0", "single_blocks.0", "single_block", 0, 5),
    ("flux_dev", "single_transformer_blocks.1", "single_blocks.1", "single_block", 1, 5),
    ("sd3", "transformer_blocks.1", "joint_blocks.1", "double_block", 1, 0),
    ("sd3", "transformer_blocks.2", "joint_blocks.2", "double_block", 2, 0),  # the last, context pre-only block
]
FAMILY = {"flux": "flux", "flux_dev": "flux", "sd3": "sd3"}


def busy_ids(sae, grid_out, n=2):
    codes = sae.encode(grid_out.movedim(1, -1))
    share = (codes > 0).float().flatten(0, 2).mean(0)
    return [int(i) for i in torch.argsort((share - 0.3).abs())[:n]]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("size,cfg,batch", [((80, 56), 1.0, 1), ((48, 104), 3.0, 2)])
def test_patch_replacer_on_dit_blocks(pack, request, case, size, cfg, batch):
    fixture, name, comfy_name, kind, index, txt = case
    tiny = _tiny(request, fixture)
    ext = pack.nodes.extension
    w, h = size
    guidance = 3.5 if fixture == "flux_dev" else None
    gh, gw = math.ceil(h // 8 / 2), math.ceil(w // 8 / 2)  # 56 -> latent 7 -> 4 rows (padded)
    sae = make_sae(pack, WIDTH, hook=name, family=FAMILY[fixture])
    base = run(tiny.model, width=w, height=h, cfg=cfg, batch=batch, guidance=guidance)

    probe, rec0 = add_recorder(tiny.model, kind, index)
    run(probe, width=w, height=h, cfg=1.0, steps=1, guidance=guidance)
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], txt, gh, gw))
    det = typed_detector(pack, sae, ids, padding=0)

    inner, rec_in = add_recorder(tiny.model, kind, index)
    patched, dets = ext.PatchReplacer.execute(inner, det, mode="random", target="output", seed=3,
                                              look_ahead=False).args
    outer, rec_out = add_recorder(patched, kind, index)
    out = run(outer, width=w, height=h, cfg=cfg, batch=batch, guidance=guidance)
    assert torch.isfinite(out).all()
    assert rec_in.calls and len(rec_in.calls) == len(rec_out.calls)  # the chained foreign patch ran every call

    edited = 0
    for s, ((seq_in, txt_in, chunks), (seq_out, txt_out, _)) in enumerate(zip(rec_in.calls, rec_out.calls, strict=True)):
        assert seq_in.shape[1] == txt + gh * gw
        # never the text tokens: the single blocks' leading text tokens and the double blocks' txt stream
        assert torch.equal(seq_out[:, :txt], seq_in[:, :txt])
        if txt_in is not None:
            assert txt_out is txt_in
        g_in, g_out = image_grid(seq_in, txt, gh, gw), image_grid(seq_out, txt, gh, gw)
        mask = ref_mask(sae, g_in, ids, [0.0] * len(ids), 1.0, 0)  # [rows, gh, gw]
        n = seq_in.shape[0] // len(chunks)
        for c, flag in enumerate(chunks):
            keys, masks = dets.recorder.masks("cond" if flag == 0 else "uncond", 0)
            assert masks.shape[1:] == (gh, gw)
            torch.testing.assert_close(masks[keys.index(s)], mask[c * n])
        for r in range(seq_in.shape[0]):
            m = mask[r]
            keep = ~m
            # PER: undetected tokens bit-identical, detected ones copied from undetected tokens of the same map
            assert torch.equal(g_out[r][:, keep], g_in[r][:, keep])
            if m.any() and keep.any():
                sources = g_in[r][:, keep].T  # [K, C]
                for y, x in m.nonzero().tolist():
                    assert (sources == g_out[r][:, y, x]).all(-1).any()
                edited += 1
    assert edited, "nothing was detected: the test would not see a wrong replacement"
    assert not torch.equal(out, base)
    assert not tiny.model.model_options.get("transformer_options", {}).get("patches_replace")


@pytest.mark.parametrize("fixture,name", [("flux", "single_transformer_blocks.1"), ("sd3", "transformer_blocks.0")])
def test_identity_settings_are_bit_identical(pack, request, fixture, name):
    tiny = _tiny(request, fixture)
    ext = pack.nodes.extension
    sae = make_sae(pack, WIDTH, hook=name, family=FAMILY[fixture])
    cfg = 3.0 if fixture == "sd3" else 1.0
    base = run(tiny.model, width=96, height=40, cfg=cfg)
    nothing = typed_detector(pack, sae, [1, 2], typed_threshold=1e6)
    m, det = ext.PatchReplacer.execute(tiny.model, nothing, mode="random", target="output", seed=0,
                                       look_ahead=False).args
    torch.testing.assert_close(run(m, width=96, height=40, cfg=cfg), base, rtol=0, atol=0)
    assert det.recorder.records and not any(r.mask().any() for r in det.recorder.records)
    some = typed_detector(pack, sae, [1, 2, 3, 4])
    m2, det2 = ext.SAESteer.execute(m, some, method="saeuron_scale", strength=1.0, error="preserve",
                                    detected_only=False).args
    torch.testing.assert_close(run(m2, width=96, height=40, cfg=cfg), base, rtol=0, atol=0)
    assert any(r.mask().any() for r in det2.recorder.records)
    # steering that does edit changes the result, on the image tokens' grid
    m3, det3 = ext.SAESteer.execute(tiny.model, some, method="saeuron_scale", strength=-4.0, error="preserve",
                                    detected_only=True).args
    assert not torch.equal(run(m3, width=96, height=40, cfg=cfg), base)
    assert det3.recorder.records[0].hw == (3, 6)


def test_mask_preview_on_flux(pack, flux):
    ext = pack.nodes.extension
    sae = make_sae(pack, WIDTH, hook="single_transformer_blocks.0", family="flux")
    probe, rec0 = add_recorder(flux.model, "single_block", 0)
    run(probe, width=96, height=64, steps=1)
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], 5, 4, 6))
    m, dets = ext.PatchReplacer.execute(flux.model, typed_detector(pack, sae, ids), mode="nearest", target="output",
                                        seed=0, look_ahead=False).args
    run(m, width=96, height=64, steps=2)
    images = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    overlay, mask = ext.MaskPreview.execute(dets, images, step=-1, aggregate="max", branch="cond", show="mask",
                                            opacity=0.5, color="#ff0000").args
    keys, grids = dets.recorder.masks("cond", 0)
    g = grids.any(0).float()
    assert g.shape == (4, 6) and 0 < float(g.mean()) < 1
    torch.testing.assert_close(mask[0], g.repeat_interleave(16, 0).repeat_interleave(16, 1))


class DitClip(FakeClip):
    def encode_from_tokens_scheduled(self, tokens):
        (cond, extra), = super().encode_from_tokens_scheduled(tokens)
        g = torch.Generator().manual_seed(len(tokens))
        return [[cond, {**extra, "pooled_output": torch.randn(1, POOLED, generator=g)}]]


def test_learn_concept_on_flux_matches_recorded_codes(pack, flux):
    ext = pack.nodes.extension
    sae = make_sae(pack, WIDTH, M=64, hook="transformer_blocks.0", family="flux")
    inner, rec = add_recorder(flux.model, "double_block", 0)
    kw = dict(concept_name="cat", concept_prompts="a cat\na cat on a mat", contrast_prompts="a dog\na house",
              negative_prompt="", width=64, height=48, steps=2, cfg=1.0, sampler_name="euler",
              scheduler="simple", seed=188, selection="top_n", percentile=99.0, top_n=2)
    concept = ext.LearnConcept.execute(inner, DitClip(), sae, **kw).args[0]
    assert concept.names == ("cat",) and concept.meta.model_family == "flux"
    assert len(rec.calls) == 4 * 2
    mu = {"cat": [], "other": []}
    for p in range(4):
        per_t = [sae.encode(image_grid(rec.calls[p * 2 + s][0], 0, 3, 4).movedim(1, -1)).flatten(0, 2).double().mean(0)
                 for s in range(2)]
        mu["cat" if p < 2 else "other"].append(torch.stack(per_t))
    mc, mn = torch.stack(mu["cat"]).mean(0), torch.stack(mu["other"]).mean(0)
    score = mc / (mc.sum(-1, keepdim=True) + 1e-8) - mn / (mn.sum(-1, keepdim=True) + 1e-8)
    ms = flux.model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "simple", 2)
    for s in range(2):
        t = concept.timestep_index(float(ms.timestep(sig[s:s + 1])))  # FLUX's timestep is sigma (0..1)
        got = [int(i) for i in concept.latents[0, t] if i >= 0]
        assert set(got) == set(torch.topk(score[s], 2).indices.tolist())


def test_errors_and_interrupts_leave_nothing_patched(pack, flux, sd3):
    ext = pack.nodes.extension
    base = run(flux.model)
    # a wrong width fails before sampling, naming the block and both widths
    wrong = make_sae(pack, 32, hook="single_transformer_blocks.0", family="flux")
    with pytest.raises(ValueError) as e:
        ext.PatchReplacer.execute(flux.model, typed_detector(pack, wrong, [1]), mode="random", target="output",
                                  seed=0, look_ahead=False)
    for part in ("single_transformer_blocks.0", "diffusion_model.single_blocks.0", f"has {WIDTH} channels",
                 "d_in=32"):
        assert part in str(e.value), str(e.value)
    # an SAE of another family
    other = make_sae(pack, WIDTH, hook="transformer_blocks.0", family="sd3")
    with pytest.raises(ValueError, match="trained on sd3.*model is flux"):
        ext.PatchReplacer.execute(flux.model, typed_detector(pack, other, [1]), mode="random", target="output",
                                  seed=0, look_ahead=False)
    # an interrupt inside sampling: the run state is released, the input model never carried the patch
    sae = make_sae(pack, WIDTH, hook="transformer_blocks.1", family="flux")
    m, dets = ext.PatchReplacer.execute(flux.model, typed_detector(pack, sae, [1, 2]), mode="random",
                                        target="output", seed=0, look_ahead=False).args
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            pos, neg = dit_conds()
            latent = torch.zeros(1, 16, 7, 10)

            def stop(*_):
                comfy.model_management.throw_exception_if_processing_interrupted()

            comfy.sample.sample(m, latent.clone(), 2, 1.0, "euler", "simple", pos, neg, latent, callback=stop,
                                disable_pbar=True, seed=1)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert dets.active == 0
    assert not flux.model.model_options.get("transformer_options", {}).get("patches_replace")
    torch.testing.assert_close(run(flux.model), base, rtol=0, atol=0)
    # Learn Concept interrupted on SD3
    sae3 = make_sae(pack, WIDTH, M=64, hook="transformer_blocks.0", family="sd3")
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ext.LearnConcept.execute(sd3.model, DitClip(), sae3, concept_name="cat", concept_prompts="a cat",
                                     contrast_prompts="", negative_prompt="", width=64, height=64, steps=2, cfg=3.0,
                                     sampler_name="euler", scheduler="simple", seed=1, selection="top_n",
                                     percentile=99.0, top_n=2)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not sd3.model.model_options.get("transformer_options", {}).get("patches_replace")


@pytest.mark.parametrize("mode,target", [("random", "output"), ("nearest", "output"), ("mean", "output"),
                                         ("background", "output"), ("random", "residual")])
def test_every_per_mode_keeps_text_and_undetected_tokens(pack, flux, mode, target):
    ext = pack.nodes.extension
    txt, gh, gw = 5, 4, 5  # 80 x 64 px -> latent 10 x 8 -> 5 x 4 tokens... rows first: 64 px = 4 rows
    sae = make_sae(pack, WIDTH, hook="single_transformer_blocks.1", family="flux")
    probe, rec0 = add_recorder(flux.model, "single_block", 1)
    run(probe, width=80, height=64, steps=1)
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], txt, gh, gw))
    inner, rec_in = add_recorder(flux.model, "single_block", 1)
    patched, dets = ext.PatchReplacer.execute(inner, typed_detector(pack, sae, ids), mode=mode, target=target,
                                              seed=2, look_ahead=False).args
    outer, rec_out = add_recorder(patched, "single_block", 1)
    run(outer, width=80, height=64, steps=2)
    changed = False
    for (seq_in, _, _), (seq_out, _, _) in zip(rec_in.calls, rec_out.calls, strict=True):
        assert torch.equal(seq_out[:, :txt], seq_in[:, :txt])
        mask = ref_mask(sae, image_grid(seq_in, txt, gh, gw), ids, [0.0] * len(ids), 1.0, 0)
        g_in, g_out = image_grid(seq_in, txt, gh, gw), image_grid(seq_out, txt, gh, gw)
        assert torch.equal(g_out.permute(0, 2, 3, 1)[~mask], g_in.permute(0, 2, 3, 1)[~mask])
        changed = changed or not torch.equal(g_out, g_in)
    assert changed, [float(r.mask().float().mean()) for r in dets.recorder.records]


@pytest.mark.parametrize("fixture,name,kind,index,txt", [("flux", "single_transformer_blocks.0", "single_block", 0, 5),
                                                        ("sd3", "transformer_blocks.1", "double_block", 1, 0)])
def test_residual_sae_sees_output_minus_input(pack, request, fixture, name, kind, index, txt):
    """The block input is kept before the block runs (ComfyUI's FLUX single block updates it in place)."""
    tiny = _tiny(request, fixture)
    ext = pack.nodes.extension
    gh, gw = 4, 5
    sae = make_sae(pack, WIDTH, hook=name, family=FAMILY[fixture], input_space="residual")
    probe, rec0 = add_recorder(tiny.model, kind, index)
    run(probe, width=80, height=64, steps=1)
    resid = image_grid(rec0.calls[0][0], txt, gh, gw) - image_grid(rec0.inputs[0], txt, gh, gw)
    assert resid.abs().amax() > 0
    ids = busy_ids(sae, resid)
    inner, rec = add_recorder(tiny.model, kind, index)
    m, dets = ext.PatchReplacer.execute(inner, typed_detector(pack, sae, ids), mode="random", target="residual",
                                        seed=0, look_ahead=False).args
    run(m, width=80, height=64, steps=2, cfg=3.0 if fixture == "sd3" else 1.0)
    for s, ((seq, _, chunks), x_in) in enumerate(zip(rec.calls, rec.inputs, strict=True)):
        ref = ref_mask(sae, image_grid(seq, txt, gh, gw) - image_grid(x_in, txt, gh, gw), ids, [0.0] * len(ids),
                       1.0, 0)
        assert 0 < float(ref.float().mean()) < 1
        for c, flag in enumerate(chunks):
            keys, masks = dets.recorder.masks("cond" if flag == 0 else "uncond", 0)
            torch.testing.assert_close(masks[keys.index(s)], ref[c])


def test_look_ahead_runs_two_passes_on_flux(pack, flux):
    ext = pack.nodes.extension
    txt, gh, gw = 5, 4, 5
    sae = make_sae(pack, WIDTH, hook="single_transformer_blocks.0", family="flux")
    probe, rec0 = add_recorder(flux.model, "single_block", 0)
    run(probe, width=80, height=64, steps=1)
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], txt, gh, gw))
    inner, rec = add_recorder(flux.model, "single_block", 0)
    m, dets = ext.PatchReplacer.execute(inner, typed_detector(pack, sae, ids), mode="random", target="output", seed=0,
                                        look_ahead=True).args
    base = run(flux.model, width=80, height=64, steps=2)
    out = run(m, width=80, height=64, steps=2)
    assert len(rec.calls) == 2 * 2  # detect pass + edit pass, two steps each, from the same noise
    torch.testing.assert_close(rec.calls[0][0], rec.calls[2][0], rtol=0, atol=0)  # same first-step input
    assert not torch.equal(out, base) and dets.recorder.keys() == [0, 1]
    assert not flux.model.model_options.get("transformer_options", {}).get("patches_replace")


def test_registry_matches_comfyui_models_at_published_sizes(pack):
    """ComfyUI's own FLUX and MMDiT classes at the published sizes (on the meta device: no memory): the registry's
    ComfyUI names exist, their width is the registry's, and nothing hookable is missing."""
    import importlib

    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ops

    blocks = pack.sae_core.blocks
    dit_hook = importlib.import_module(pack.__name__ + ".nodes.dit_hook")
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        flux = comfy.ldm.flux.model.Flux(
            operations=ops, in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
            mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True)
        sd3 = {depth: comfy.ldm.modules.diffusionmodules.mmdit.MMDiT(
            operations=ops, in_channels=16, out_channels=16, patch_size=2, depth=depth, adm_in_channels=2048,
            pos_embed_max_size=192, num_patches=192 * 192,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                             "out_features": 64 * depth}})
            for depth in (24, 38)}
    models = {"flux": flux, "sd3": sd3[24], "sd35large": sd3[38]}
    for family, model in models.items():
        mods = dict(model.named_modules())
        names = [s.comfy for s in blocks.blocks(family)]
        hookable = [n for n in mods if n.count(".") == 1 and n.split(".")[0] in ("double_blocks", "single_blocks",
                                                                               "joint_blocks")]
        assert names == hookable
        for s in blocks.blocks(family):
            assert dit_hook.dit_block_width(mods[s.comfy]) == s.channels
            assert dit_hook.is_dit_key(s.comfy_key)


def test_bf16_flux_with_an_fp32_sae(pack, comfy_threads):
    """FLUX runs in bf16: the fp32 SAE is cast to the tokens' dtype, edited tokens go back as bf16, the text tokens
    and undetected tokens stay bit-identical."""
    tiny = build_flux(seed=31, dtype=torch.bfloat16)
    ext = pack.nodes.extension
    txt, gh, gw = 5, 4, 5
    sae = make_sae(pack, WIDTH, hook="single_transformer_blocks.0", family="flux")
    probe, rec0 = add_recorder(tiny.model, "single_block", 0)
    run(probe, width=80, height=64, steps=1)
    assert rec0.calls[0][0].dtype == torch.bfloat16
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], txt, gh, gw).float())
    inner, rec_in = add_recorder(tiny.model, "single_block", 0)
    m, dets = ext.PatchReplacer.execute(inner, typed_detector(pack, sae, ids), mode="random", target="output",
                                        seed=0, look_ahead=False).args
    outer, rec_out = add_recorder(m, "single_block", 0)
    out = run(outer, width=80, height=64, steps=2)
    assert torch.isfinite(out).all()
    edited = False
    for (seq_in, _, _), (seq_out, _, _) in zip(rec_in.calls, rec_out.calls, strict=True):
        assert seq_out.dtype == torch.bfloat16 and torch.equal(seq_out[:, :txt], seq_in[:, :txt])
        g_in, g_out = image_grid(seq_in, txt, gh, gw), image_grid(seq_out, txt, gh, gw)
        recorded = dets.recorder.masks("cond", 0)[1]
        keep = ~recorded.any(0)
        assert torch.equal(g_out[0][:, keep], g_in[0][:, keep])
        edited = edited or not torch.equal(g_out, g_in)
    assert edited


@pytest.mark.parametrize("kind,index,txt", [("double_block", 1, 0), ("single_block", 0, 5)])
def test_kontext_reference_tokens_are_left_alone(pack, flux, kind, index, txt):
    """With reference latents (FLUX Kontext) the sequence holds the sampled image's tokens, then the reference's:
    only the former are detected and edited, on the sampled latent's grid."""
    ext = pack.nodes.extension
    gh, gw = 4, 5
    ref = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(5))  # 3 x 3 reference tokens

    def conds():
        pos, neg = dit_conds()
        return [[c, {**e, "reference_latents": [ref]}] for c, e in pos], neg

    def go(model, steps):
        pos, neg = conds()
        return sample(model, "dit", width=80, height=64, cfg=1.0, steps=steps, positive=pos, negative=neg)

    name = "transformer_blocks.1" if kind == "double_block" else "single_transformer_blocks.0"
    sae = make_sae(pack, WIDTH, hook=name, family="flux")
    probe, rec0 = add_recorder(flux.model, kind, index)
    go(probe, 1)
    assert rec0.calls[0][0].shape[1] == txt + gh * gw + 9
    ids = busy_ids(sae, image_grid(rec0.calls[0][0], txt, gh, gw))
    inner, rec_in = add_recorder(flux.model, kind, index)
    m, dets = ext.PatchReplacer.execute(inner, typed_detector(pack, sae, ids), mode="random", target="output",
                                        seed=0, look_ahead=False).args
    outer, rec_out = add_recorder(m, kind, index)
    go(outer, 2)
    edited = False
    for s, ((seq_in, _, _), (seq_out, _, _)) in enumerate(zip(rec_in.calls, rec_out.calls, strict=True)):
        n = txt + gh * gw
        assert torch.equal(seq_out[:, :txt], seq_in[:, :txt]) and torch.equal(seq_out[:, n:], seq_in[:, n:])
        mask = ref_mask(sae, image_grid(seq_in, txt, gh, gw), ids, [0.0] * len(ids), 1.0, 0)
        keys, masks = dets.recorder.masks("cond", 0)
        torch.testing.assert_close(masks[keys.index(s)], mask[0])
        edited = edited or not torch.equal(seq_out, seq_in)
    assert edited


@pytest.mark.parametrize("kind,index,name,txt", [("double_block", 1, "transformer_blocks.1", 0),
                                                  ("single_block", 0, "single_transformer_blocks.0", 5)])
def test_collect_activations_on_flux_records_the_image_tokens(pack, flux, tmp_path, kind, index, name, txt):
    """Collect Activations on a FLUX block stores the image tokens the block returned (never text tokens), row-major
    per image and step, as float16, and records the family."""
    import folder_paths

    tn = pack.nodes.train_nodes
    inner, rec = add_recorder(flux.model, kind, index)
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        out = tn.CollectActivations.execute(
            inner, DitClip(), block=name, prompts="a cat\na dog", negative_prompt="", dataset_name="flux_tiny",
            width=64, height=48, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", seed=3,
            input_space="output", branches="cond", patches_per_map=0, shard_rows=1024, overwrite=False)
    finally:
        folder_paths.set_output_directory(old)
    ds = pack.sae_core.dataset.ActivationDataset.open(out.args[0])
    got = torch.cat([ds.load(i) for i in range(len(ds.shards))]).float()
    # reference: the image tokens (after the text tokens of single blocks) of every recorded call, 3 x 4 grid
    ref = torch.cat([image_grid(seq, txt, 3, 4).permute(0, 2, 3, 1).reshape(-1, WIDTH) for seq, _, _ in rec.calls])
    assert len(rec.calls) == 2 * 2 and ds.d_in == WIDTH and got.shape == ref.shape
    torch.testing.assert_close(got, ref.half().float(), rtol=0, atol=0)
    assert ds.manifest["model"]["family"] == "flux" and ds.manifest["block"] == name
    assert not flux.model.model_options.get("transformer_options", {}).get("patches_replace")
