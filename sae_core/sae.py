"""SparseAutoencoder: the exact forward of every supported SAE kind, on any device and dtype."""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SAEConfig
from .errors import SAEInputError, SAENonFiniteError, SAEShapeError


class NormState(NamedTuple):
    """Per-row input normalisation to undo after decoding: x_n = (x - mean) / in_scale, y = y_n * out_scale + mean."""

    mean: Tensor | None
    in_scale: Tensor
    out_scale: Tensor


class SAEOutput(NamedTuple):
    codes: Tensor
    """Dense codes [..., M]."""
    x_hat: Tensor
    """Reconstruction [..., d] in the input's space (normalisation undone, skip connection added)."""


class TopKCodes(NamedTuple):
    """The kept latents of TopK-style SAEs: values [..., k] and their latent ids [..., k]."""

    values: Tensor
    indices: Tensor
    norm: NormState | None


class SAEWeights(NamedTuple):
    """The weights cast to one (device, dtype); W_enc and W_dec are both [M, d]."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None
    W_skip: Tensor | None


def _check(name: str, tensor: Tensor, shape: tuple[int, ...], source: str) -> None:
    if not isinstance(tensor, Tensor):
        raise SAEShapeError(f"{source}: {name!r} should be a tensor of shape {shape}, found {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise SAEShapeError(
            f"{source}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}, expected a floating-point "
            "dtype (float32, float16, bfloat16); the file is damaged or was written by another tool"
        )
    if tuple(tensor.shape) != shape:
        raise SAEShapeError(
            f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} "
            f"for this config; the weights and the config disagree (wrong file, or wrong d_in / n_latents)"
        )
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise SAENonFiniteError(
            f"{source}: tensor {name!r} holds {bad} NaN/inf values, expected only finite values; "
            f"the checkpoint is corrupt or was saved after a diverged training step"
        )


class SparseAutoencoder(nn.Module):
    """An SAE whose encode/decode follows the original code of its format exactly.

    ``encode`` computes in the input's dtype and device; weights are cast lazily and cached per
    (device, dtype), so the same object serves fp32 tests and fp16 GPU sampling.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor | None = None,
        W_skip: Tensor | None = None,
        latent_mean: Tensor | None = None,
        latent_std: Tensor | None = None,
        source: str = "<memory>",
    ) -> None:
        super().__init__()
        cfg.validate()
        M, d = cfg.n_latents, cfg.d_in
        tensors = {"W_enc": (W_enc, (M, d)), "b_enc": (b_enc, (M,)), "W_dec": (W_dec, (M, d)), "b_dec": (b_dec, (d,))}
        if cfg.activation == "jumprelu":
            if threshold is None:
                raise SAEShapeError(f"{source}: activation 'jumprelu' needs a 'threshold' tensor of shape ({M},)")
            tensors["threshold"] = (threshold, (M,))
        elif threshold is not None:
            raise SAEShapeError(
                f"{source}: a 'threshold' tensor was given but activation is {cfg.activation!r}; "
                f"use activation='jumprelu' for JumpReLU checkpoints"
            )
        if W_skip is not None:
            tensors["W_skip"] = (W_skip, (d, d))
        if latent_mean is not None:
            tensors["latent_mean"] = (latent_mean, (M,))
        if latent_std is not None:
            tensors["latent_std"] = (latent_std, (M,))
        for name, (tensor, shape) in tensors.items():
            _check(name, tensor, shape, source)

        self.cfg = cfg
        self.source = source
        self.W_enc = nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.detach().clone(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold.detach().clone(), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip.detach().clone(), requires_grad=False)
        self.register_buffer("latent_mean", None if latent_mean is None else latent_mean.detach().float().clone())
        self.register_buffer("latent_std", None if latent_std is None else latent_std.detach().float().clone())
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[tuple[int, ...], SAEWeights]] = {}
        self._fingerprint: tuple[tuple[int, ...], str] | None = None

    # -- weights -------------------------------------------------------------------------------

    def _own(self) -> SAEWeights:
        return SAEWeights(self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.W_skip)

    def _versions(self) -> tuple[int, ...]:
        # Tensors made under torch.inference_mode() (ComfyUI runs every node in it) have no version
        # counter; they can only change in place inside inference mode, so their identity has to do.
        return tuple(-1 if t is None or t.is_inference() else t._version for t in self._own()) + tuple(
            id(t) for t in self._own()
        )

    def weights(self, device: torch.device | str, dtype: torch.dtype) -> SAEWeights:
        """The weights on ``device`` in ``dtype``; cast once and cached until the weights change."""
        device = torch.device(device)
        own = self._own()
        if own.W_enc.device == device and own.W_enc.dtype == dtype:
            return own
        key = (device, dtype)
        versions = self._versions()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        cast = SAEWeights(*(None if t is None else t.detach().to(device=device, dtype=dtype) for t in own))
        self._cache[key] = (versions, cast)
        return cast

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the weights are kept in (``weights(device, stored_dtype)`` casts nothing)."""
        return self.W_dec.dtype

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, recurse=True):  # .to()/.half() replace the parameters: drop stale casts
        self._cache.clear()
        return super()._apply(fn, recurse)

    # -- forward -------------------------------------------------------------------------------

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEShapeError(
                f"{self.source}: input has width {x.shape[-1]} in its last dim, expected d_in={self.cfg.d_in}; "
                f"feed the activations of the block this SAE was trained on (channels last)"
            )

    def normalize(self, x: Tensor) -> tuple[Tensor, NormState | None]:
        """Apply the config's per-row input normalisation; returns the state that undoes it."""
        kind = self.cfg.normalization
        if kind == "none":
            return x, None
        if kind == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = (x - mean).std(dim=-1, keepdim=True)
            state = NormState(mean, std + self.cfg.layer_norm_eps, std)
            return (x - mean) / state.in_scale, state
        # constant_norm_rescale: every row scaled to norm sqrt(d_in)
        scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.cfg.d_in)
        return x / scale, NormState(None, scale, scale)

    @staticmethod
    def denormalize(y: Tensor, norm: NormState | None) -> Tensor:
        if norm is None:
            return y
        y = y * norm.out_scale
        return y if norm.mean is None else y + norm.mean

    def pre_acts(self, x: Tensor, norm_out: list | None = None) -> Tensor:
        """Linear pre-activations ``W_enc (x_n - b_dec) + b_enc`` [..., M], before any nonlinearity."""
        self._check_width(x)
        w = self.weights(x.device, x.dtype)
        xn, norm = self.normalize(x)
        if norm_out is not None:
            norm_out.append(norm)
        if self.cfg.apply_b_dec_to_input:
            xn = xn - w.b_dec
        # block maps arrive as channels-last views of channels-first tensors; a strided GEMM input is 5-15x slower
        # on CPU than copying the [N, d] rows first (the copy is small next to the [N, M] product)
        return F.linear(xn.contiguous(), w.W_enc, w.b_enc)

    def _select(self, pre: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
        """Kept (values, indices) for TopK-style activations, values after the activation.

        ``inplace``: ``pre`` is a temporary of the caller and may be overwritten (saves one [..., M] tensor)."""
        act, k = self.cfg.activation, self.cfg.k
        if act == "relu_topk":
            values, indices = torch.topk(F.relu(pre, inplace=inplace), k, dim=-1, sorted=False)
        elif act == "topk_relu":
            values, indices = torch.topk(pre, k, dim=-1, sorted=False)
            values = F.relu(values)
        elif act == "sigmoid_topk":
            values, indices = torch.topk(pre, k, dim=-1, sorted=False)
            values = torch.sigmoid(values)
        else:  # groupmax
            group = self.cfg.n_latents // k
            values, indices = F.relu(pre, inplace=inplace).unflatten(-1, (k, group)).max(dim=-1)
            indices = indices + torch.arange(0, self.cfg.n_latents, group, device=pre.device)
        return values, indices

    def activate(self, pre: Tensor) -> Tensor:
        """Dense codes [..., M] from pre-activations, per the config's activation."""
        act = self.cfg.activation
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            threshold = self.weights(pre.device, pre.dtype).threshold
            return F.relu(pre) * (pre > threshold).to(pre.dtype)
        values, indices = self._select(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode_with_norm(self, x: Tensor) -> tuple[Tensor, NormState | None]:
        norm: list = []
        codes = self.activate(self.pre_acts(x, norm))
        return codes, norm[0]

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., M] of x [..., d_in]; at most k non-zeros per row for TopK kinds."""
        return self.encode_with_norm(x)[0]

    def encode_topk(self, x: Tensor) -> TopKCodes:
        """Kept latents only (TopK kinds): cheaper than dense codes when M is large."""
        if not self.cfg.is_topk:
            raise SAEInputError(f"encode_topk needs a TopK-style activation, this SAE uses {self.cfg.activation!r}")
        norm: list = []
        values, indices = self._select(self.pre_acts(x, norm), inplace=True)
        return TopKCodes(values, indices, norm[0])

    def decode(self, codes: Tensor, norm: NormState | None = None) -> Tensor:
        """x_hat [..., d] = codes W_dec + b_dec, de-normalised when ``norm`` is given. No skip term."""
        if codes.shape[-1] != self.cfg.n_latents:
            raise SAEShapeError(
                f"{self.source}: codes have {codes.shape[-1]} latents in their last dim, expected {self.cfg.n_latents}"
            )
        w = self.weights(codes.device, codes.dtype)
        return self.denormalize(torch.addmm(w.b_dec, codes.reshape(-1, codes.shape[-1]), w.W_dec).reshape(
            *codes.shape[:-1], self.cfg.d_in), norm)

    def decode_topk(self, values: Tensor, indices: Tensor, norm: NormState | None = None) -> Tensor:
        """Same as ``decode`` of the dense codes, from kept (values, indices) only."""
        w = self.weights(values.device, values.dtype)
        flat_i = indices.reshape(-1, indices.shape[-1])
        flat_v = values.reshape(-1, values.shape[-1])
        out = F.embedding_bag(flat_i, w.W_dec, per_sample_weights=flat_v, mode="sum") + w.b_dec
        return self.denormalize(out.reshape(*values.shape[:-1], self.cfg.d_in), norm)

    def forward(self, x: Tensor) -> SAEOutput:
        codes, norm = self.encode_with_norm(x)
        x_hat = self.decode(codes, norm)
        if self.W_skip is not None:  # sparsify transcoder-style skip: applies to the raw input
            x_hat = x_hat + x @ self.weights(x.device, x.dtype).W_skip.mT
        return SAEOutput(codes, x_hat)

    @property
    def firing_level(self) -> float:
        """The code above which a latent counts as firing: its pre-activation is positive. 0 for the ReLU kinds;
        0.5 = sigmoid(0) for Sigmoid(TopK), where every kept latent has a positive code."""
        return 0.5 if self.cfg.activation == "sigmoid_topk" else 0.0

    # -- identity ------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A stable hash of the config's shape and all weights; concept files bind to it."""
        versions = self._versions()
        if self._fingerprint is not None and self._fingerprint[0] == versions:
            return self._fingerprint[1]
        h = hashlib.sha256(f"{self.cfg.d_in}x{self.cfg.n_latents}:{self.cfg.activation}:{self.cfg.k}".encode())
        for t in self._own():
            if t is not None:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest = h.hexdigest()[:16]
        self._fingerprint = (versions, digest)
        return digest

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, n_latents={c.n_latents}, k={c.k}, activation={c.activation}, "
            f"input_space={c.input_space}, hook_point={c.hook_point}, family={c.model_family}"
        )
