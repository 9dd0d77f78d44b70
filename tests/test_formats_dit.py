"""FLUX SAE checkpoints: Krea's TopK layout (config.json + model.safetensors) and sparsify folders named after
diffusers transformer hooks, read exactly and placed on the registry's DiT blocks."""

import json

import pytest
import torch
from sae_builders import random_weights, write_sparsify
from safetensors.torch import save_file

from sae_core.errors import SAEFormatError
from sae_core.formats import detect_format, load_sae

D, M, K = 3072, 24, 4  # FLUX width (so the block fits), few latents (small files)


def write_finebooru(directory, w, k=K, extra=None):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"features": D, "pages": M, "k": k}))
    tensors = {"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"],
               "decoder.weight": w["W_dec"].T.contiguous(), "bias": w["b_dec"], **(extra or {})}
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def reference_encode(x, w, k):
    """Krea's module, written out: ReLU(encoder(x - bias)), keep the top k, scatter back."""
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"])
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)


def test_finebooru_image_stream_checkpoint_reads_exactly(tmp_path):
    w = random_weights(D, M, sparse_bias=False)
    where = write_finebooru(tmp_path / "cc3m-transformer_blocks.18-1", w)
    assert detect_format(where)[0] == "finebooru"
    sae = load_sae(where)
    assert (sae.cfg.hook_point, sae.cfg.model_family) == ("transformer_blocks.18", "flux")
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(3))
    f = reference_encode(x, w, K)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.decode(f), f @ w["W_dec"] + w["b_dec"])
    single = load_sae(write_finebooru(tmp_path / "cc3m-single_transformer_blocks.9", w))
    assert (single.cfg.hook_point, single.cfg.model_family) == ("single_transformer_blocks.9", "flux")


def test_finebooru_refusals(tmp_path):
    w = random_weights(D, M)
    with pytest.raises(SAEFormatError, match="stream 0.*text tokens"):
        load_sae(write_finebooru(tmp_path / "cc3m-transformer_blocks.0-0", w))
    bad = write_finebooru(tmp_path / "x-single_transformer_blocks.1", w)
    (bad / "config.json").write_text(json.dumps({"features": D, "pages": M}))
    with pytest.raises(SAEFormatError, match="no 'k'"):
        load_sae(bad)
    with pytest.raises(SAEFormatError, match="unexpected tensors.*logthres"):
        load_sae(write_finebooru(tmp_path / "y", w, extra={"logthres": torch.zeros(M)}))


@pytest.mark.parametrize("folder,hook", [("transformer.single_transformer_blocks.9", "single_transformer_blocks.9"),
                                         ("transformer.transformer_blocks.3", "transformer_blocks.3")])
def test_sparsify_folder_named_after_a_flux_hook(tmp_path, folder, hook):
    sae = load_sae(write_sparsify(tmp_path / folder, random_weights(D, M), k=K))
    assert (sae.cfg.hook_point, sae.cfg.model_family) == (hook, "flux")


def test_a_model_folder_with_the_same_file_names_is_not_taken_for_an_sae(tmp_path):
    d = tmp_path / "some_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3}))
    save_file({"conv.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    with pytest.raises(SAEFormatError, match="unrecognised layout|config but the weights are missing"):
        detect_format(d)
