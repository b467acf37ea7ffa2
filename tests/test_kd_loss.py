"""The fused KD loss equals plain autograd through log_softmax (value and gradients), in fp32 and bf16, and the
compiled chunk kernel equals the eager one."""
import pytest
import torch

from qatlm.train import kd_loss as K
from qatlm.train.kd_loss import _FusedHeadKD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 0.3)])
def test_fused_kd_matches_autograd(temperature, ce_weight, dtype):
    torch.manual_seed(0)
    N, H, V = 24, 16, 50
    hs = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    tg = torch.randint(0, V, (N,))
    tg[-1] = -1  # no target for the last position
    nt = int((tg >= 0).sum())
    s = _FusedHeadKD.apply(hs.float(), ws.float(), ht.float(), wt.float(), tg, temperature, ce_weight * N / nt, 7,
                           dtype)
    got = torch.autograd.grad(s[0] / N, [hs, ws])
    lpt = torch.log_softmax(ht @ wt.T / temperature, -1)
    lps = torch.log_softmax(hs @ ws.T / temperature, -1)
    kl = (lpt.exp() * (lpt - lps)).sum() * temperature ** 2 / N
    lp1 = torch.log_softmax(hs @ ws.T, -1)
    ce = -(lp1[torch.arange(N), tg.clamp(min=0)] * (tg >= 0)).sum() / nt
    want = torch.autograd.grad(kl + ce_weight * ce, [hs, ws])
    if dtype == torch.float32:  # fp32 against the fp64 reference: agreement to fp32 rounding
        assert float(s[0] / N) == pytest.approx(float(kl), rel=1e-5, abs=1e-6)
        assert float(s[1] / nt) == pytest.approx(float(ce), rel=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:  # bf16 matmuls (8 significant bits in inputs, logits and dz): agreement to bf16 rounding
        assert float(s[0] / N) == pytest.approx(float(kl), rel=0.03)
        assert float(s[1] / nt) == pytest.approx(float(ce), rel=0.02)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05 * float(b.abs().max()))


@pytest.mark.parametrize("ce_scale", [0.0, 0.7])
def test_compiled_chunk_equals_eager(ce_scale, monkeypatch):
    """The torch.compile'd chunk (used for chunks of >= 1M logits on CPU) computes what the eager one does: the
    same formulas fused, so equal up to the order of fp32 additions in the row reductions."""
    torch.manual_seed(1)
    c, V = 128, 8192
    zs, zt = (torch.randn(c, V) * 4).bfloat16(), (torch.randn(c, V) * 4).bfloat16()
    valid = torch.ones(c)
    valid[-1] = 0
    from qatlm.formats import _kernels

    # earlier tests in the same process may have switched the format kernels to eager (recompile limit): that
    # flag is theirs; this test is about the KD chunk's compiled path
    monkeypatch.setattr(_kernels, "_compile_failed", False)
    fn = K._chunk_fn(zs)
    assert fn is not K._kd_chunk  # the compiled path is the one under test
    a = fn(zs, zt, valid, 1.0, ce_scale)
    b = K._kd_chunk(zs, zt, valid, 1.0, ce_scale)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-5)
    assert a[2].dtype == torch.bfloat16
    # dz is rounded to bf16 at the end: equal, or one bf16 step apart where fp32 sums differed in the last bit
    torch.testing.assert_close(a[2].float(), b[2].float(), rtol=2 ** -7, atol=1e-9)


def test_hidden_mse_term(tmp_path):
    """hidden_weight adds the layers' relative squared error against the teacher's hidden states: zero for a copy
    of the teacher, the hand-computed value otherwise, with a gradient reaching the first layer; the KL part is
    unchanged by it, and hidden_weight 0 returns the KD loss alone."""
    import copy

    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_gemma3

    teacher = AutoModelForCausalLM.from_pretrained(tiny_gemma3(tmp_path / "g", num_hidden_layers=4)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    student = copy.deepcopy(teacher)
    loss, parts = K.kd_loss(student, teacher, ids, hidden_weight=2.0)
    assert parts["hidden"] == 0.0 and parts["kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in student.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss, parts = K.kd_loss(student, teacher, ids, hidden_weight=2.0)
    plain, plain_parts = K.kd_loss(student, teacher, ids)
    assert "hidden" not in plain_parts and plain_parts["kl"] == pytest.approx(parts["kl"], rel=1e-6)
    with torch.no_grad():
        hs = student.model(ids, output_hidden_states=True).hidden_states
        ht = teacher.model(ids, output_hidden_states=True).hidden_states
    want = sum(float((a - b).pow(2).sum() / b.pow(2).sum()) for a, b in zip(hs[1:4], ht[1:4])) / 3  # layers 0-2
    assert parts["hidden"] == pytest.approx(want, rel=1e-5) and want > 0
    assert float(loss) == pytest.approx(float(plain) + 2.0 * want, rel=1e-5)
    loss.backward()
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
