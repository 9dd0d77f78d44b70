"""The newer backend's multi-GPU path and clone variants on ComfyUI's real ModelPatcher and tiny UNets.

0.3.64 has neither ``clone(model_override=...)`` nor threaded multi-GPU sampling: ``NewerPatcher`` adds the
first the way the newer ModelPatcher does it (a clone with another module tree, ON_CLONE callbacks called
after the model is set), and the test runs one step's chunks in two threads on two model trees, as the newer
``_calc_cond_batch_multigpu`` does (``multigpu_thread_device`` set, ``sample_sigmas`` copied per call). Both
"devices" are the CPU. Also: the SAE weights ride along as a ComfyUI-managed additional model.
"""

import copy
import threading

import comfy.model_management
import comfy.model_patcher
import pytest
import torch
from test_nodes_comfyui import SD1_BLOCK, make_sae, typed_detector
from tiny_unets import CONTEXT, sample

KEY = "diffusion_model." + SD1_BLOCK[1]


class NewerPatcher(comfy.model_patcher.ModelPatcher):
    """0.3.64's ModelPatcher with the newer clone signature."""

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        n = super().clone()
        n.__class__ = NewerPatcher
        if model_override is None and not force_deepcopy:
            return n
        n.model = model_override if model_override is not None else copy.deepcopy(self.model)
        n.backup, n.object_patches_backup = {}, {}
        for cb in self.get_all_callbacks("on_clone"):  # the newer clone calls them with the new model in place
            cb(self, n)
        return n


def newer(tiny_model):
    n = tiny_model.clone()
    n.__class__ = NewerPatcher
    return n


def run_unet(patcher, x, sigma, sample_sigmas, flags, device=None):
    """One model call the way the cond batch makes it, on ``patcher``'s loaded (object-patched) model."""
    ms = patcher.get_model_object("model_sampling")
    to = {"sigmas": sigma.clone(), "sample_sigmas": sample_sigmas.clone(), "cond_or_uncond": list(flags)}
    if device is not None:
        to["multigpu_thread_device"] = device
    g = torch.Generator().manual_seed(11)
    ctx = torch.randn(x.shape[0], 5, CONTEXT, generator=g)
    t = ms.timestep(sigma).float().expand(x.shape[0])
    return patcher.model.diffusion_model(x, t, context=ctx, transformer_options=to)


def patched_model(pack, base):
    ext = pack.nodes.extension
    sae = make_sae(pack, SD1_BLOCK[2])
    det = typed_detector(pack, sae, [3, 17, 40, 91])
    out = ext.PatchReplacer.execute(base, det, "random", "output", 5)
    return out.args[0], out.args[1], sae


def test_clone_variants_on_the_real_patcher(pack, sd1):
    m, state, sae = patched_model(pack, newer(sd1.model))
    fwd = m.object_patches[KEY + ".forward"]
    assert m.clone().object_patches[KEY + ".forward"] is fwd  # 0.3.64 clone: same modules, same patch
    deep = m.clone(force_deepcopy=True)
    moved = deep.object_patches[KEY + ".forward"]
    assert moved is not fwd and moved.sae_state is state
    assert moved.sae_prev.__self__ is comfy.utils.get_attr(deep.model, KEY)
    assert fwd.sae_prev.__self__ is comfy.utils.get_attr(sd1.model.model, KEY)
    # model_options copied the newer way (dicts/lists only) or the old way (deepcopy): the same run state
    opts = deep.model_options["transformer_options"][pack.nodes.hook.OPTIONS_KEY]
    assert list(opts.values()) == [state]
    # the SAE rides along as a ComfyUI model
    extra = m.get_additional_models_with_key(pack.nodes.patching.SAE_MODELS_KEY)
    assert len(extra) == 1 and extra[0].model is sae


def test_two_device_threads_record_what_one_device_records(pack, sd1):
    comfy.model_management.unload_all_models()  # the shared tiny model may still carry an earlier test's patches
    m, state, _ = patched_model(pack, newer(sd1.model))
    dev1 = m.clone(force_deepcopy=True)  # the second device's own model tree (pristine copy + our patches)
    g = torch.Generator().manual_seed(5)
    xs = {0: torch.randn(1, 4, 12, 16, generator=g), 1: torch.randn(1, 4, 12, 16, generator=g)}
    ms = m.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.sigma_max), 3.0, 1.0, 0.0])

    def reference():
        state.begin(ms)
        try:
            return [[run_unet(m, xs[f], sigmas[i:i + 1], sigmas, (f,)) for f in (0, 1)] for i in range(3)]
        finally:
            state.end()

    m.patch_model()
    try:
        ref = reference()
    finally:
        m.unpatch_model()
    ref_masks = {(b, i): state.recorder.masks(b, i) for b in ("cond", "uncond") for i in (0,)}
    blocks = {"cuda:0": comfy.utils.get_attr(m.model, KEY), "cuda:1": comfy.utils.get_attr(dev1.model, KEY)}
    assert blocks["cuda:0"] is not blocks["cuda:1"]
    m.patch_model()
    dev1.patch_model()
    try:
        for _ in range(4):  # repeated runs
            state.begin(ms)
            try:
                outs, errs = [], []
                for i in range(3):
                    res = {}

                    def work(p, f, dev, i=i, res=res, errs=errs):
                        try:
                            with torch.no_grad():  # as ComfyUI's device workers (grad mode is per thread)
                                res[f] = run_unet(p, xs[f], sigmas[i:i + 1], sigmas, (f,), dev)
                        except BaseException as e:  # re-raised below
                            errs.append(e)

                    ts = [threading.Thread(target=work, args=(m, 0, "cuda:0")),
                          threading.Thread(target=work, args=(dev1, 1, "cuda:1"))]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                    assert not errs, errs
                    outs.append([res[0], res[1]])
            finally:
                state.end()
            for step_out, step_ref in zip(outs, ref, strict=True):
                for a, b in zip(step_out, step_ref, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            for k, (keys, masks) in ref_masks.items():
                got_keys, got = state.recorder.masks(*k)
                assert got_keys == keys and torch.equal(got, masks)
            assert sorted(state.hits) == ["cuda:0", "cuda:1"] and not state.warnings
    finally:
        dev1.unpatch_model()
        m.unpatch_model()
    for b in blocks.values():  # unpatched again: ComfyUI restores each tree's own forward
        assert not hasattr(b.forward, "sae_state")


def test_sae_weights_load_and_unload_with_the_model(pack, sd1):
    m, state, sae = patched_model(pack, sd1.model)
    comfy.model_management.unload_all_models()
    sample(m, "sd1", steps=2)
    assert state.recorder.records
    loaded = [lm.model for lm in comfy.model_management.current_loaded_models]
    sae_loaded = [p for p in loaded if getattr(p, "model", None) is sae]
    assert sae_loaded, "ComfyUI did not load the SAE with the model"
    assert sae_loaded[0].loaded_size() >= sum(p.numel() * p.element_size() for p in sae.parameters())
    comfy.model_management.unload_all_models()
    assert all(p.device == comfy.model_management.unet_offload_device() for p in sae.parameters())
    assert not any(getattr(lm.model, "model", None) is sae for lm in comfy.model_management.current_loaded_models)


def test_sae_patcher_gives_device_clones_an_empty_placeholder(pack, monkeypatch):
    """The newer deepclone_multigpu rebuilds every additional model from its cached_patcher_init (and fails
    without one); ours builds an empty module, so no second copy of the SAE weights is made per device."""
    ext = pack.nodes.patching
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "cached_patcher_init", None, raising=False)
    p = ext.sae_patcher(make_sae(pack, 32, M=64))
    fn, args = p.cached_patcher_init[:2]
    other = fn(*args, disable_dynamic=True)
    assert isinstance(other, comfy.model_patcher.ModelPatcher) and not list(other.model.parameters())
    assert other.load_device == p.load_device and other.offload_device == p.offload_device


def test_later_unchained_patch_warns_and_mask_preview_says_why(pack, sd1, caplog):
    m, state, _ = patched_model(pack, sd1.model)
    later = m.clone()
    later.add_object_patch(KEY + ".forward", comfy.utils.get_attr(sd1.model.model, KEY).forward)  # no chaining
    with caplog.at_level("WARNING"):
        sample(later, "sd1", steps=2)
    assert not state.recorder.records and "never called the SAE patch" in caplog.text
    images = torch.zeros(1, 96, 128, 3)
    with pytest.raises(ValueError, match="never called the SAE patch on " + KEY.replace(".", r"\.")):
        pack.nodes.extension.MaskPreview.execute(state, images, -1, "max", "cond", "mask", 0.5, "#ff0000")
