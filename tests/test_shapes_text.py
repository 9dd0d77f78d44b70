"""Tokenizer ids and the text encoder's values against a reference written in the test."""

import pytest
import torch
import torch.nn.functional as F

from shapes_world.scenes import generate_scenes
from shapes_world.text import VOCAB, TextEncoder, TextEncoderConfig, Tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machines running this suite are small and shared: intra-op threads only add contention here.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tokenizer_ids_and_padding():
    tok = Tokenizer(max_length=8)
    ids = tok.encode(["a red circle", ""])
    v = {w: i for i, w in enumerate(VOCAB)}
    want = torch.tensor(
        [
            [v["<bos>"], v["a"], v["red"], v["circle"]] + [v["<pad>"]] * 4,
            [v["<bos>"]] + [v["<pad>"]] * 7,
        ]
    )
    assert torch.equal(ids, want)
    assert tok.decode(ids) == ["a red circle", ""]


def test_tokenizer_round_trips_generated_captions():
    tok = Tokenizer()
    caps = generate_scenes(128, seed=5).captions
    assert tok.decode(tok.encode(caps)) == caps


def test_tokenizer_rejects_unknown_word():
    with pytest.raises(ValueError, match="word 'hexagon'.*not in the vocabulary"):
        Tokenizer().encode(["a red hexagon"])


def test_tokenizer_rejects_too_long_caption():
    with pytest.raises(ValueError, match="has 5 words, at most 3 fit"):
        Tokenizer(max_length=4).encode(["a red circle and a"])


def test_tokenizer_rejects_special_tokens_in_text():
    with pytest.raises(ValueError, match="'<pad>'"):
        Tokenizer().encode(["a <pad> circle"])


def _reference_encoder(enc: TextEncoder, ids: torch.Tensor) -> torch.Tensor:
    """Pre-norm transformer written out by hand from the module's parameters."""
    cfg = enc.cfg
    h = enc.token.weight[ids] + enc.position
    b, length, d = h.shape
    nh, hd = cfg.heads, d // cfg.heads
    for layer in enc.blocks.layers:
        x = F.layer_norm(h, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        qkv = x @ layer.self_attn.in_proj_weight.T + layer.self_attn.in_proj_bias
        q, k, v = qkv.split(d, dim=-1)
        q, k, v = (t.reshape(b, length, nh, hd).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, length, d)
        h = h + att @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
        x = F.layer_norm(h, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        h = h + F.gelu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return F.layer_norm(h, (d,), enc.norm.weight, enc.norm.bias, enc.norm.eps)


@pytest.mark.parametrize("layers,heads,dim", [(1, 2, 16), (2, 4, 32)])
def test_text_encoder_matches_reference(layers, heads, dim):
    cfg = TextEncoderConfig(max_length=12, dim=dim, layers=layers, heads=heads)
    enc = TextEncoder(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so the reference has something to check
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = Tokenizer(12).encode(["a red circle and a blue square", "", "a cyan cross on a grey background"])
    with torch.no_grad():
        got = enc(ids)
        want = _reference_encoder(enc, ids)
    assert got.shape == (3, 12, dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_position_embeddings_make_word_order_matter():
    enc = TextEncoder(TextEncoderConfig(max_length=10, dim=16, layers=1, heads=2)).eval()
    ids = Tokenizer(10).encode(["a red circle and a blue square", "a blue circle and a red square"])
    with torch.no_grad():
        out = enc(ids)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_text_encoder_rejects_wrong_length():
    enc = TextEncoder(TextEncoderConfig(max_length=10, dim=16, layers=1, heads=2))
    with pytest.raises(ValueError, match=r"expected \[B, 10\]"):
        enc(torch.zeros(2, 7, dtype=torch.long))


@pytest.mark.parametrize("kwargs,fragment", [({"dim": 30, "heads": 4}, "dim=30"), ({"layers": 0}, "layers=0")])
def test_text_encoder_config_validates(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TextEncoderConfig(**kwargs)


def test_text_encoder_config_round_trip():
    cfg = TextEncoderConfig(max_length=12, dim=32, layers=1, heads=2)
    assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
