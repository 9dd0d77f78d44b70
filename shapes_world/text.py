"""Word tokenizer over the scene grammar and a small learned text encoder (embeddings + transformer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae_core.mixins import DictRoundTrip

from .scenes import BACKGROUNDS, COLOURS, SHAPES

PAD, BOS = "<pad>", "<bos>"
# Fixed vocabulary; ids are part of the checkpoint format, so only ever append.
VOCAB: tuple[str, ...] = (PAD, BOS, "a", "and", "on", "background", "striped", *SHAPES, *COLOURS, *BACKGROUNDS)


class Tokenizer:
    """Whitespace tokenizer over VOCAB. Every sequence starts with <bos> and is padded to max_length.

    The empty caption "" encodes to <bos> followed by padding: the unconditional input for CFG.
    """

    def __init__(self, max_length: int = 20, vocab: tuple[str, ...] = VOCAB):
        if max_length < 2:
            raise ValueError(f"Tokenizer: max_length={max_length}, expected at least 2 (<bos> + one word)")
        self.vocab = tuple(vocab)
        self.max_length = int(max_length)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id = self.index[PAD], self.index[BOS]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, captions: list[str] | str) -> torch.Tensor:
        """LongTensor [B, max_length] of token ids."""
        if isinstance(captions, str):
            captions = [captions]
        out = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = caption.lower().replace(",", " ").split()
            if len(words) + 1 > self.max_length:
                raise ValueError(
                    f"Tokenizer: caption {caption!r} has {len(words)} words, at most "
                    f"{self.max_length - 1} fit (max_length {self.max_length} includes <bos>); shorten it"
                )
            ids = [self.bos_id]
            for w in words:
                if w not in self.index or w in (PAD, BOS):
                    raise ValueError(
                        f"Tokenizer: word {w!r} in caption {caption!r} is not in the vocabulary "
                        f"{list(self.vocab[2:])}; use only these words"
                    )
                ids.append(self.index[w])
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Captions back from ids [B, L] (drops <bos> and <pad>)."""
        return [
            " ".join(self.vocab[i] for i in row.tolist() if i not in (self.pad_id, self.bos_id))
            for row in ids
        ]


@dataclass
class TextEncoderConfig(DictRoundTrip):
    vocab_size: int = len(VOCAB)
    max_length: int = 20  # tokens per caption, <bos> included
    dim: int = 128  # width of encoder_hidden_states (the UNet's cross_attention_dim)
    layers: int = 2
    heads: int = 4
    ff_mult: int = 2

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"TextEncoderConfig: dim={self.dim} is not divisible by heads={self.heads}")
        for name in ("vocab_size", "max_length", "dim", "layers", "heads", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextEncoderConfig: {name}={getattr(self, name)}, expected >= 1")


class TextEncoder(nn.Module):
    """Token + learned position embeddings, pre-norm transformer, final LayerNorm -> [B, L, dim].

    Position embeddings matter here: captions list objects left to right, and without positions
    "a red circle and a blue square" and "a blue circle and a red square" would look alike.
    No attention mask: padding tokens get (learned) outputs the UNet may attend to, as with CLIP.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position = nn.Parameter(torch.randn(cfg.max_length, cfg.dim) * 0.02)
        nn.init.normal_(self.token.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, cfg.dim * cfg.ff_mult, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != self.cfg.max_length:
            raise ValueError(
                f"TextEncoder: ids have shape {tuple(ids.shape)}, expected [B, {self.cfg.max_length}] "
                f"from Tokenizer(max_length={self.cfg.max_length})"
            )
        h = self.token(ids) + self.position
        return self.norm(self.blocks(h))
