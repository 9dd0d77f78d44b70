"""Dev-only: our trainer's loss and gradients against EleutherAI sparsify's SparseCoder on the same weights and rows.

Skips unless `eai-sparsify` is installed (`pip install eai-sparsify`: about 100 MB of dependencies on top of torch
and transformers - datasets, pyarrow, pandas, accelerate - so it is not in the dev extra).

One documented difference: sparsify's fused encoder drops the gradient of the pre-activations that AuxK reads
(``FusedEncoder.backward`` ignores ``grad_preacts``), so in sparsify AuxK trains only the decoder. We follow the
paper (Gao et al. 2024, app. A.2), where the auxiliary loss also reaches the dead latents' encoder rows. Hence:
without dead latents everything must agree; with dead latents the losses and the decoder gradient must agree.
"""

import pytest
import torch

sparsify = pytest.importorskip("sparsify")

from sae_core.trainer import SAETrainer, StreamConfig  # noqa: E402


def _pair(d, M, k, x, seed):
    cfg = StreamConfig(n_latents=M, k=k, auxk_alpha=0.25, dead_after_tokens=1000, seed=seed)
    mean = x.double().mean(0)
    total_var = float((x.double() - mean).pow(2).sum(-1).mean())
    ours = SAETrainer(d, cfg, mean, total_var, torch.device("cpu"))
    with torch.no_grad():  # a b_enc that is not zero, so its gradient path is exercised
        ours.params["b_enc"].copy_(torch.randn(M) * 0.1)
    theirs = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=M, k=k))
    with torch.no_grad():
        theirs.encoder.weight.copy_(ours.params["W_enc"])
        theirs.encoder.bias.copy_(ours.params["b_enc"])
        theirs.W_dec.copy_(ours.params["W_dec"])
        theirs.b_dec.copy_(ours.params["b_dec"])
    return cfg, ours, theirs, total_var


@pytest.mark.parametrize("dead_every", [0, 2, 30])
def test_losses_and_gradients_match_sparsify(dead_every):
    torch.manual_seed(1)
    d, M, k, N = 16, 64, 4, 128
    x = torch.randn(N, d) * 1.5 + 0.3
    cfg, ours, theirs, total_var = _pair(d, M, k, x, seed=2)
    dead = torch.zeros(M, dtype=torch.bool)
    if dead_every:
        dead[::dead_every] = True

    out = ours.losses(x, N, dead)
    (out["fvu"] + cfg.auxk_alpha * out["auxk"]).backward()
    W = ours.params["W_dec"]
    W.grad -= (W.grad * W.data).sum(-1, keepdim=True) * W.data

    ref = theirs(x, dead_mask=dead, total_variance=torch.tensor(N * total_var))
    (ref.fvu + cfg.auxk_alpha * ref.auxk_loss).backward()
    theirs.remove_gradient_parallel_to_decoder_directions()

    assert float(out["fvu"].detach()) == pytest.approx(float(ref.fvu.detach()), rel=1e-5)
    assert float(out["auxk"].detach()) == pytest.approx(float(ref.auxk_loss.detach()), rel=1e-5, abs=1e-12)
    if dead_every:
        assert float(ref.auxk_loss) > 0
    torch.testing.assert_close(W.grad, theirs.W_dec.grad, rtol=1e-5, atol=1e-7)
    if not dead_every:
        torch.testing.assert_close(ours.params["W_enc"].grad, theirs.encoder.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.params["b_enc"].grad, theirs.encoder.bias.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.params["b_dec"].grad, theirs.b_dec.grad, rtol=1e-5, atol=1e-7)
    else:
        # the documented difference: only our encoder rows of dead latents receive AuxK gradient
        g_ours, g_theirs = ours.params["W_enc"].grad, theirs.encoder.weight.grad
        live = ~dead
        torch.testing.assert_close(g_ours[live], g_theirs[live], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.params["b_enc"].grad[live], theirs.encoder.bias.grad[live], rtol=1e-5, atol=1e-7)
        assert float((g_ours[dead] - g_theirs[dead]).abs().max()) > 1e-4


def test_one_step_matches_sparsify_without_dead_latents():
    torch.manual_seed(3)
    d, M, k, N = 16, 64, 4, 128
    x = torch.randn(N, d) * 1.5 + 0.3
    cfg, ours, theirs, total_var = _pair(d, M, k, x, seed=4)
    ours.step(x, N)
    params = [theirs.encoder.weight, theirs.encoder.bias, theirs.W_dec, theirs.b_dec]
    opt = torch.optim.Adam(params, lr=cfg.learning_rate(), eps=6.25e-10)
    ref = theirs(x, dead_mask=torch.zeros(M, dtype=torch.bool), total_variance=torch.tensor(N * total_var))
    ref.fvu.backward()
    theirs.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    theirs.set_decoder_norm_to_unit_norm()
    for mine, other in zip(ours.params.values(), params, strict=True):
        torch.testing.assert_close(mine.detach(), other.detach(), rtol=1e-5, atol=1e-6)
