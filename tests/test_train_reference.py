"""Our trainer's loss and one update step against a reference written here from the TopK SAE paper.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders":
  z = TopK(ReLU(W_enc (x - b_pre) + b_enc)),  x_hat = W_dec^T z + b_pre                        (sec. 2.3)
  L = ||x - x_hat||^2 / ||x - mean(x)||^2 (normalised MSE, averaged over the batch)           (sec. 2.1)
  L_aux = ||e - e_hat||^2 normalised the same way, e = x - x_hat (a constant target),
          e_hat = W_dec^T z_aux with z_aux the top-k_aux dead latents (ReLU'd pre-activations)  (app. A.2)
  loss = L + alpha L_aux; decoder rows kept at unit norm: the gradient component along each row is removed
  before the Adam step and rows are renormalised after it                                     (app. A.4)
The AuxK term is scaled by min(n_dead / k_aux, 1) as sparsify does (so a handful of dead latents do not get
the full weight). Everything below is dense matrix algebra and a hand-written Adam step: no top-k gather,
no embedding_bag, no torch.optim.
"""

import math

import pytest
import torch

from sae_core.trainer import SAETrainer, StreamConfig


def reference_losses(x, W_enc, b_enc, W_dec, b_pre, k, dead, k_aux, total_var):
    pre = (x - b_pre) @ W_enc.T + b_enc
    act = torch.relu(pre)
    kth = act.topk(k, dim=-1).values[:, -1:]
    z = torch.where(act >= kth, act, torch.zeros_like(act))
    x_hat = z @ W_dec + b_pre
    e = x - x_hat
    L = e.pow(2).sum(-1).mean() / total_var
    n_dead = int(dead.sum())
    if n_dead == 0:
        return L, torch.zeros(()), z
    ka = min(k_aux, n_dead)
    dead_act = torch.where(dead, act, torch.full_like(act, -1.0))  # live latents never chosen
    kth_aux = dead_act.topk(ka, dim=-1).values[:, -1:]
    z_aux = torch.where(dead & (dead_act >= kth_aux), act, torch.zeros_like(act))
    e_hat = z_aux @ W_dec
    L_aux = min(n_dead / k_aux, 1.0) * (e.detach() - e_hat).pow(2).sum(-1).mean() / total_var
    return L, L_aux, z


def adam_step(p, g, m, v, t, lr, b1=0.9, b2=0.999, eps=6.25e-10):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("n_dead_every", [0, 3, 40])  # no dead latents; many (scale 1); few (scale < 1)
def test_one_update_step_matches_the_paper(n_dead_every):
    torch.manual_seed(0)
    d, M, k, N = 12, 48, 4, 96
    x = torch.randn(N, d, dtype=torch.float64).float() * 2 + 0.5
    cfg = StreamConfig(n_latents=M, k=k, auxk_alpha=0.25, dead_after_tokens=1000, lr=3e-3, seed=5)
    mean = x.double().mean(0)
    total_var = float((x.double() - mean).pow(2).sum(-1).mean())
    tr = SAETrainer(d, cfg, mean, total_var, torch.device("cpu"))
    dead = torch.zeros(M, dtype=torch.bool)
    if n_dead_every:
        dead[::n_dead_every] = True
    tr.since_fired[dead] = 5000
    k_aux = d // 2
    start = {n: p.detach().clone().double() for n, p in tr.params.items()}

    # reference (float64)
    P = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    L, L_aux, z = reference_losses(x.double(), P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"], k, dead, k_aux,
                                   total_var)
    (L + cfg.auxk_alpha * L_aux).backward()
    L, L_aux = L.detach(), L_aux.detach()
    new = {}
    for n in P:
        g = P[n].grad.clone()
        if n == "W_dec":
            w = P[n].detach()
            g = g - (g * w).sum(-1, keepdim=True) * w
        new[n], _, _ = adam_step(P[n].detach(), g, torch.zeros_like(g), torch.zeros_like(g), 1, cfg.lr)
    new["W_dec"] = new["W_dec"] / new["W_dec"].norm(dim=-1, keepdim=True)

    m = tr.step(x, N, want_metrics=True)
    assert m["fvu"] == pytest.approx(float(L), rel=1e-5)
    assert m["auxk"] == pytest.approx(float(L_aux), rel=1e-4, abs=1e-9)
    assert m["l0"] == pytest.approx(float((z > 0).sum()) / N)
    assert m["dead_fraction"] == pytest.approx(float(dead.float().mean()))
    if n_dead_every:
        assert float(L_aux) > 0
    for n in new:
        # Adam's first step moves every weight by about lr (the sign of its gradient): a wrong gradient shows
        torch.testing.assert_close(tr.params[n].detach().double(), new[n], rtol=0, atol=2e-5, msg=n)
    moved = max(float((new[n] - start[n]).abs().max()) for n in new)
    assert moved > 100 * 2e-5
    # firing bookkeeping: latents that fired are reset, the others age by the batch
    fired = (z > 0).any(0)
    assert torch.equal(tr.since_fired[fired], torch.zeros(int(fired.sum()), dtype=torch.long))
    assert torch.equal(tr.since_fired[~fired & ~dead], torch.full((int((~fired & ~dead).sum()),), N))


def test_adam_constants_match_the_reference():
    # the reference's Adam uses torch's defaults and our eps; make sure the trainer does too
    cfg = StreamConfig(n_latents=8, k=2, lr=1e-3)
    tr = SAETrainer(4, cfg, torch.zeros(4), 1.0, torch.device("cpu"))
    g = tr.opt.param_groups[0]
    assert g["betas"] == (0.9, 0.999) and g["eps"] == 6.25e-10 and g["weight_decay"] == 0
    assert cfg.learning_rate() == 1e-3
    assert StreamConfig(n_latents=2**16, k=2).learning_rate() == pytest.approx(2e-4 / math.sqrt(4))
