"""The fused KD loss equals plain autograd through log_softmax (value and gradients)."""
import pytest
import torch

from qatlm.train.kd_loss import _FusedHeadKD


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 0.3)])
def test_fused_kd_matches_autograd(temperature, ce_weight):
    torch.manual_seed(0)
    N, H, V = 24, 16, 50
    hs = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    tg = torch.randint(0, V, (N,))
    tg[-1] = -1  # no target for the last position
    nt = int((tg >= 0).sum())
    s = _FusedHeadKD.apply(hs.float(), ws.float(), ht.float(), wt.float(), tg, temperature, ce_weight * N / nt, 7)
    got = torch.autograd.grad(s[0] / N, [hs, ws])
    lpt = torch.log_softmax(ht @ wt.T / temperature, -1)
    lps = torch.log_softmax(hs @ ws.T / temperature, -1)
    kl = (lpt.exp() * (lpt - lps)).sum() * temperature ** 2 / N
    lp1 = torch.log_softmax(hs @ ws.T, -1)
    ce = -(lp1[torch.arange(N), tg.clamp(min=0)] * (tg >= 0)).sum() / nt
    want = torch.autograd.grad(kl + ce_weight * ce, [hs, ws])
    # the fused function computes in fp32, the reference in fp64: agreement to fp32 rounding
    assert float(s[0] / N) == pytest.approx(float(kl), rel=1e-5, abs=1e-6)
    assert float(s[1] / nt) == pytest.approx(float(ce), rel=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
