"""Writers of every checkpoint format in its real on-disk layout, and a float64 NumPy reference forward.

The reference is written from docs/FORMULAS.md sections 2 and 3, row by row, independently of sae_core.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# -- random weights ------------------------------------------------------------------------------


def random_weights(d: int, M: int, *, seed: int = 0, sparse_bias: bool = True) -> dict[str, torch.Tensor]:
    """Encoder [M, d], b_enc [M], unit-norm decoder rows [M, d], b_dec [d].

    With ``sparse_bias`` most encoder biases are strongly negative so that many rows have fewer than
    k positive pre-activations (the case where ReLU/TopK order and index bookkeeping matter).
    """
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(M, d, generator=g) / d**0.5
    b_enc = torch.randn(M, generator=g) * 0.1
    if sparse_bias:
        b_enc = b_enc - 2.0 * (torch.rand(M, generator=g) > 0.15).float()
    W_dec = torch.randn(M, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    b_dec = torch.randn(d, generator=g) * 0.2
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


# -- writers (file names, key names, shapes and cfg fields of each original) ------------------------


def write_sparsify(directory: Path, w: dict, *, k: int, activation: str = "topk", saeuron: bool = False, **cfg_extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    M, d = w["W_enc"].shape
    cfg = {"expansion_factor": M // d, "normalize_decoder": True, "num_latents": M, "k": k,
           "multi_topk": False, "skip_connection": False, "d_in": d}
    if activation != "topk":
        cfg["activation"] = activation
    if saeuron:  # SAeUron's fork drops 'activation' and adds these
        cfg.update({"batch_topk": True, "sample_topk": False, "input_unit_norm": False})
    cfg.update(cfg_extra)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
              str(directory / "sae.safetensors"))
    return directory


def write_saelens(directory: Path, w: dict, *, architecture: str = "standard", k: int | None = None,
                  legacy: bool = False, threshold: torch.Tensor | None = None, log_threshold: bool = False,
                  normalize: str = "none", apply_b_dec_to_input: bool = True, hook: str = "unet.up_blocks.1.attentions.1",
                  **cfg_extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    M, d = w["W_enc"].shape
    if legacy:  # pre-6.0: hook_point / activation_fn_str / activation_fn_kwargs at top level
        cfg = {"architecture": "standard" if architecture == "topk" else architecture, "d_in": d, "d_sae": M,
               "hook_point": hook, "activation_fn_str": "topk" if architecture == "topk" else "relu",
               "activation_fn_kwargs": {"k": k} if architecture == "topk" else {},
               "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize,
               "dtype": "float32", "device": "cpu"}
    else:
        cfg = {"architecture": architecture, "d_in": d, "d_sae": M, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize,
               "reshape_activations": "none", "metadata": {"hook_name": hook, "model_name": "sd-v1-5"}}
        if k is not None:
            cfg["k"] = k
    cfg.update(cfg_extra)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if threshold is not None:
        if log_threshold:
            tensors["log_threshold"] = threshold.log()
        else:
            tensors["threshold"] = threshold
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    return directory


def write_unbox(directory: Path, w: dict, *, k: int, stats: bool = True, openai_extras: bool = False,
                normalize: bool = False, on_cuda_map: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    M, d = w["W_enc"].shape
    cfg = {"n_dirs_local": M, "d_model": d, "k": k, "auxk": 256, "dead_steps_threshold": 2441}
    if normalize:
        cfg["normalize"] = True
    (directory / "config.json").write_text(json.dumps(cfg))
    state = {"pre_bias": w["b_dec"], "latent_bias": w["b_enc"], "stats_last_nonzero": torch.zeros(M, dtype=torch.long),
             "encoder.weight": w["W_enc"], "decoder.weight": w["W_dec"].T.contiguous()}
    if openai_extras:  # OpenAI's Autoencoder.state_dict records its activation
        state["activation"] = "TopK"
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    torch.save({"state_dict": state}, directory / "state_dict.pth")
    if stats:
        torch.save(torch.rand(M) + 0.5, directory / "mean.pt")
        torch.save(torch.rand(M) + 0.1, directory / "std.pt")
    return directory


# -- float64 reference forward, row by row -------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def reference_forward(x, w: dict, *, activation: str, k: int | None = None, threshold=None,
                      normalize: str = "none", apply_b_dec: bool = True, ln_eps: float = 1e-5):
    """(codes, x_hat) for x [..., d] per docs/FORMULAS.md section 2, computed one row at a time in float64."""
    x = _np(x)
    W_enc, b_enc, W_dec, b_dec = (_np(w[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    M, d = W_enc.shape
    rows = x.reshape(-1, d)
    codes = np.zeros((rows.shape[0], M))
    recon = np.zeros_like(rows)
    for r, row in enumerate(rows):
        mu, std, scale = 0.0, 1.0, 1.0
        if normalize == "layer_norm":
            mu = row.mean()
            std = np.sqrt(((row - mu) ** 2).sum() / (d - 1))  # torch.std: unbiased
            row = (row - mu) / (std + ln_eps)
        elif normalize == "constant_norm_rescale":
            scale = np.sqrt(d) / np.sqrt((row**2).sum())
            row = row * scale
        pre = W_enc @ (row - b_dec if apply_b_dec else row) + b_enc
        f = np.zeros(M)
        if activation == "relu":
            f = np.maximum(pre, 0)
        elif activation == "jumprelu":
            t = _np(threshold)
            f = np.where(pre > t, np.maximum(pre, 0), 0.0)
        elif activation == "relu_topk":
            relu = np.maximum(pre, 0)
            keep = np.argsort(-relu, kind="stable")[:k]
            f[keep] = relu[keep]
        elif activation == "topk_relu":
            keep = np.argsort(-pre, kind="stable")[:k]
            f[keep] = np.maximum(pre[keep], 0)
        elif activation == "sigmoid_topk":
            keep = np.argsort(-pre, kind="stable")[:k]
            f[keep] = 1 / (1 + np.exp(-pre[keep]))
        elif activation == "groupmax":
            g = M // k
            for j in range(k):
                seg = np.maximum(pre[j * g:(j + 1) * g], 0)
                f[j * g + int(np.argmax(seg))] = seg.max()
        else:
            raise ValueError(activation)
        codes[r] = f
        out = f @ W_dec + b_dec
        if normalize == "layer_norm":
            out = out * std + mu
        elif normalize == "constant_norm_rescale":
            out = out / scale
        recon[r] = out
    return codes.reshape(*x.shape[:-1], M), recon.reshape(x.shape)


def positives_below_k(x, w: dict, k: int) -> int:
    """How many rows have fewer than k positive pre-activations (so the test covers that case)."""
    pre = _np(x).reshape(-1, w["W_enc"].shape[1]) - _np(w["b_dec"])
    pre = pre @ _np(w["W_enc"]).T + _np(w["b_enc"])
    return int(((pre > 0).sum(-1) < k).sum())


def varied_input(shape: tuple[int, ...], *, seed: int = 1) -> torch.Tensor:
    """Rows of very different norms: small rows leave fewer than k positive pre-activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.linspace(0.01, 1.2, x[..., 0].numel()).reshape(x.shape[:-1] + (1,))
