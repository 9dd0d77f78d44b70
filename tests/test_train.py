"""The TopK SAE trainer learns a planted sparse dictionary, keeps decoder rows unit norm, and revives dead latents."""

import pytest
import torch

from sae_core import load_sae, save_native
from sae_core.train import TrainConfig, auxk_loss, fraction_of_variance_unexplained, train_sae


def sparse_data(n=4096, d=16, atoms=24, active=2, seed=0):
    """Rows = sums of `active` random unit atoms with positive weights: a TopK SAE can explain them."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D = D / D.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    w = torch.rand(n, active, generator=g) + 0.5
    return (w[..., None] * D[idx]).sum(1) + 0.3, D


def test_training_reduces_fvu_and_keeps_unit_decoder_rows():
    acts, _ = sparse_data()
    before = train_sae(acts, TrainConfig(n_latents=48, k=2, steps=1, batch_size=256, lr=3e-3)).sae
    result = train_sae(acts, TrainConfig(n_latents=48, k=2, steps=400, batch_size=256, lr=3e-3, log_every=100))
    sae = result.sae
    fvu_before = fraction_of_variance_unexplained(before, acts)
    fvu_after = fraction_of_variance_unexplained(sae, acts)
    assert fvu_after < 0.25 < fvu_before
    assert [e["step"] for e in result.log] == [100, 200, 300, 400]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-5, rtol=0)
    assert not sae.W_enc.requires_grad
    assert int((sae.encode(acts[:50]) != 0).sum(-1).max()) <= 2


def test_learned_directions_match_the_planted_atoms():
    acts, D = sparse_data(n=8192)
    sae = train_sae(acts, TrainConfig(n_latents=48, k=2, steps=800, batch_size=512, lr=3e-3)).sae
    cos = (D @ sae.W_dec.T).max(dim=1).values  # best decoder row per planted atom
    assert float(cos.median()) > 0.9


def test_auxk_loss_matches_a_reference_and_only_trains_dead_latents():
    g = torch.Generator().manual_seed(0)
    N, M, d, k_aux = 5, 12, 6, 3
    pre = torch.randn(N, M, generator=g)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[1, 4, 5, 7, 9]] = True
    err = torch.randn(N, d, generator=g)
    W_dec = torch.randn(M, d, generator=g).requires_grad_(True)
    total_var = torch.tensor(2.5)
    loss = auxk_loss(pre, dead, err, W_dec, k_aux, total_var)
    ref = 0.0
    for n in range(N):  # per row: best k_aux dead latents by raw pre-activation, ReLU, decode, squared error
        cand = sorted((int(i) for i in dead.nonzero()), key=lambda i: -float(pre[n, i]))[:k_aux]
        e_hat = sum(max(float(pre[n, i]), 0.0) * W_dec[i].detach() for i in cand)
        ref += float(((e_hat - err[n]) ** 2).sum())
    ref = min(5 / k_aux, 1.0) * ref / N / 2.5
    assert abs(float(loss.detach()) - ref) < 1e-5
    loss.backward()
    assert float(W_dec.grad[~dead].abs().sum()) == 0.0  # live latents get nothing from AuxK
    assert float(W_dec.grad[dead].abs().sum()) > 0.0
    assert float(auxk_loss(pre, torch.zeros(M, dtype=torch.bool), err, W_dec, k_aux, total_var)) == 0.0


def test_training_is_seeded_and_round_trips(tmp_path):
    acts, _ = sparse_data(n=1024)
    cfg = TrainConfig(n_latents=32, k=2, steps=20, batch_size=64, seed=3)
    a = train_sae(acts, cfg, sae_config={"hook_point": "up_blocks.1.attentions.0", "input_space": "output"}).sae
    b = train_sae(acts, cfg, sae_config={"hook_point": "up_blocks.1.attentions.0", "input_space": "output"}).sae
    torch.testing.assert_close(a.W_dec, b.W_dec, atol=0, rtol=0)
    back = load_sae(save_native(a, tmp_path / "t.safetensors"))
    torch.testing.assert_close(back.encode(acts[:10]), a.encode(acts[:10]), atol=0, rtol=0)
    assert back.cfg.provenance["train_config"]["steps"] == 20


def test_bad_activations_are_refused():
    with pytest.raises(ValueError, match=r"expected activations \[N, d\]"):
        train_sae(torch.zeros(5), TrainConfig(n_latents=4, k=1))
    bad = torch.zeros(8, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        train_sae(bad, TrainConfig(n_latents=4, k=1))
    with pytest.raises(ValueError, match=r"TrainConfig.k: expected 1..4, found 5"):
        TrainConfig(n_latents=4, k=5)
