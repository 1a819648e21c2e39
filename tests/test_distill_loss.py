"""hass_ext.ops.distill_loss / fused_linear_distill_loss against the plain-PyTorch HASS formulas."""
import json
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import hass_ext
from hass_ext import ops
from hass_ext import oracles as R

CUDA = torch.cuda.is_available() and "cuda" in hass_ext.available_devices()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed():
    """A different seed per test; HASS_FRESH_SEEDS=1 draws new ones each run (printed on failure)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "")
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("HASS_FRESH_SEEDS") else zlib.crc32(test.encode())
    print(f"seed {seed}")
    torch.manual_seed(seed)
    return seed


def _losses_and_grad(fn, z, t, m, k, w_ce, w_topk):
    z = z.detach().clone().requires_grad_(True)
    ce, tk = fn(z, t, m, k)
    (g,) = torch.autograd.grad(w_ce * ce + w_topk * tk, z)
    return ce.detach(), tk.detach(), g


def _compare(z, t, m, k, *, rtol=1e-5, grad_rtol=1e-5, grad_atol=None, oracle_inputs=None):
    w_ce, w_topk = float(torch.rand(())) + 0.1, float(torch.rand(())) + 0.1
    ce, tk, g = _losses_and_grad(ops.distill_loss, z, t, m, k, w_ce, w_topk)
    zo, to = oracle_inputs if oracle_inputs is not None else (z.float(), t.float())
    ce0, tk0, g0 = _losses_and_grad(R.distill_loss_oracle, zo, to, m, k, w_ce, w_topk)
    assert ce.dtype == torch.float32 and ce.dim() == 0 and tk.dim() == 0
    torch.testing.assert_close(ce, ce0.float(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(tk, tk0.float(), rtol=rtol, atol=1e-6)
    assert g.dtype == z.dtype and g.shape == z.shape
    fi = torch.finfo(z.dtype)  # the gradient is rounded to the input dtype: allow its subnormal spacing
    atol = grad_atol if grad_atol is not None else 1e-6 * float(g0.abs().max()) + fi.smallest_normal * fi.eps
    torch.testing.assert_close(g.float(), g0.to(g.dtype).float(), rtol=grad_rtol, atol=atol)
    return ce, tk, g


# ---- values and gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("N,V,k", [(1, 7, 1), (13, 300, 10), (33, 1031, 64), (8, 5000, 3), (5, 64, 64),
                                   (2, 262144, 64)])
def test_fp32_matches_oracle(N, V, k):
    _seed()
    z = torch.randn(N, V) * 3
    t = torch.randn(N, V) * 3
    m = (torch.rand(N) > 0.3).float()
    m[0] = 1.0
    # at V = 256k the fp32 oracle's own rounding (log q, softmax) reaches ~1e-5: evaluate it in float64 there
    _compare(z, t, m, k, oracle_inputs=(z.double(), t.double()) if V > 100_000 else None)


def test_leading_dims_and_mask_forms():
    _seed()
    z = torch.randn(2, 9, 333)
    t = torch.randn(2, 9, 333)
    mb = torch.rand(2, 9) > 0.4
    ce, tk, _ = _compare(z, t, mb, 10)
    for mask in (mb.float(), mb[..., None], mb.float()[..., None]):  # HASS passes loss_mask[..., None]
        ce2, tk2 = ops.distill_loss(z, t, mask, 10)
        assert torch.equal(ce, ce2) and torch.equal(tk, tk2)
    # fractional weights enter both the numerator and S
    w = torch.rand(2, 9)
    _compare(z, t, w, 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_masks_as_tokenizers_return_them(dtype):
    # attention/loss masks come from tokenizers as int64 (or int32, uint8, bool): same losses as the float mask
    _seed()
    z, t = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    m = (torch.rand(3, 7) > 0.4).long()
    m[0, 0] = 1
    want = ops.distill_loss(z, t, m.float(), 5)
    for mask in (m.to(dtype), m.to(dtype)[..., None]):
        got = ops.distill_loss(z, t, mask, 5)
        assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want))
    w = torch.randn(50, 16) / 4
    x, y = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    want = ops.fused_linear_distill_loss(x, y, w, m.float(), topk=5)
    got = ops.fused_linear_distill_loss(x, y, w, m.to(dtype), topk=5)
    assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want))
    if dtype != torch.bool:
        bad = m.to(dtype).clone()
        bad[1, 2] = 3
        with pytest.raises(ValueError, match="loss_mask is an integer mask and must hold only 0 and 1"):
            ops.fused_linear_distill_loss(x, y, w, bad, topk=5)


def test_bf16_and_mixed_dtypes():
    """Stated tolerances for low-precision inputs: the losses equal the fp32 oracle on the same (upcast) values
    to 1e-5; the returned gradient is within one ulp of its dtype (bf16 2^-7, fp16 2^-10 relative)."""
    _seed()
    N, V = 17, 2053
    z32, t32 = torch.randn(N, V) * 4, torch.randn(N, V) * 4
    m = (torch.rand(N) > 0.2).float()
    zb, tb = z32.bfloat16(), t32.bfloat16()  # bf16 logits are full of exact ties: exercises the tie rule
    assert (tb.float().sort(-1).values.diff(dim=-1) == 0).any()
    # the kernel accumulates in fp32, so against the oracle on the same (upcast) values it is fp32-exact;
    # only the bf16 rounding of the returned gradient remains (one bf16 ulp)
    _compare(zb, tb, m, 10, grad_rtol=2**-7, oracle_inputs=(zb.float(), tb.float()))
    _compare(zb, t32, m, 10, grad_rtol=2**-7, oracle_inputs=(zb.float(), t32))
    _compare(z32, tb, m, 10, oracle_inputs=(z32, tb.float()))
    _compare(z32.half(), t32.half(), m, 5, grad_rtol=2**-10, oracle_inputs=(z32.half().float(), t32.half().float()))
    # and against the fp32 oracle on the unrounded logits: within bf16 input rounding
    ce, tk = ops.distill_loss(zb, tb, m, 10)
    ce0, tk0 = R.distill_loss_oracle(z32, t32, m, 10)
    torch.testing.assert_close(ce, ce0, rtol=2e-2, atol=0)
    torch.testing.assert_close(tk, tk0, rtol=5e-2, atol=0)


def test_matches_literal_hass_formula_without_ties():
    # HASS main_hass.py compute_loss as written: torch.topk over target_p, gather of p * log q
    _seed()
    B, T, V = 2, 6, 500
    z, t = torch.randn(B, T, V), torch.randn(B, T, V)
    loss_mask = (torch.rand(B, T) > 0.3).float()[..., None]
    ploss, topk_loss = R.hass_compute_loss_reference(z, torch.softmax(t, dim=2), loss_mask, 10)
    ce, tk = ops.distill_loss(z, t, loss_mask, 10)
    torch.testing.assert_close(ce, ploss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tk, topk_loss, rtol=1e-5, atol=1e-6)


def test_tie_rule_lowest_index_wins():
    V = 12
    t = torch.zeros(1, V)
    t[0, [2, 5, 7, 9]] = 3.0      # four-way tie for the top, K = 2 must take indices 2 and 5
    z = torch.randn(1, V)
    m = torch.ones(1)
    _, tk = ops.distill_loss(z, t, m, 2)
    p, lq = torch.softmax(t, -1)[0], torch.log_softmax(z, -1)[0]
    expect = -(p[2] * lq[2] + p[5] * lq[5]) / (1 + 1e-5)  # S = sum(m) + 1e-5
    torch.testing.assert_close(tk, expect, rtol=1e-6, atol=1e-7)
    assert R.distill_topk_indices(t, 2).tolist() == [[2, 5]]
    # a flat target: every logit ties, the top-K are the first K indices
    flat = torch.full((3, 100), 0.25)
    _compare(torch.randn(3, 100), flat, torch.ones(3), 9)


def test_k_equals_v_gives_ce():
    _seed()
    for V in (1, 2, 64):
        z, t = torch.randn(4, V), torch.randn(4, V)
        ce, tk, g = _compare(z, t, torch.ones(4), V)
        torch.testing.assert_close(tk, ce, rtol=1e-5, atol=1e-6)


def test_masked_rows_are_not_read():
    _seed()
    N, V = 9, 257
    z, t = torch.randn(N, V), torch.randn(N, V)
    m = torch.ones(N)
    m[[1, 4, 8]] = 0
    ce0, tk0, g0 = _compare(z, t, m, 10)
    z2, t2 = z.clone(), t.clone()
    z2[[1, 4, 8]] = float("nan")
    t2[[1, 4]] = float("inf")
    ce, tk, g = _losses_and_grad(ops.distill_loss, z2, t2, m, 10, 1.0, 1.0)
    assert torch.isfinite(ce) and torch.isfinite(tk)
    ce1, tk1, g1 = _losses_and_grad(ops.distill_loss, z, t, m, 10, 1.0, 1.0)
    assert torch.equal(ce, ce1) and torch.equal(tk, tk1) and torch.equal(g, g1)
    assert torch.all(g[[1, 4, 8]] == 0)


def test_all_rows_masked():
    z, t = torch.randn(5, 100), torch.randn(5, 100)
    for m in (torch.zeros(5), torch.zeros(5, dtype=torch.bool)):
        ce, tk, g = _losses_and_grad(ops.distill_loss, z, t, m, 10, 1.0, 1.0)
        assert ce.item() == 0.0 and tk.item() == 0.0
        assert torch.all(g == 0) and torch.isfinite(g).all()
    ce, tk = ops.distill_loss(torch.randn(0, 50), torch.randn(0, 50), torch.zeros(0), 3)  # no rows at all
    assert ce.item() == 0.0 and tk.item() == 0.0


def test_peaked_and_flat_targets():
    _seed()
    N, V = 6, 3001
    z = torch.randn(N, V)
    peaked = torch.randn(N, V)
    peaked[torch.arange(N), torch.randint(0, V, (N,))] += 60.0   # p ~ 1 on one token, others ~ 1e-26
    _compare(z, peaked, torch.ones(N), 10)
    _compare(z, torch.randn(N, V) * 1e-3, torch.ones(N), 10)      # nearly uniform
    _compare(peaked, z, torch.ones(N), 10)                         # peaked draft: log q ~ -60 almost everywhere


@pytest.mark.parametrize("scale", ["offset", "spread"])
def test_large_logits(scale):
    _seed()
    N, V = 7, 4099
    if scale == "offset":   # logits around 1e4: exp without max-subtraction overflows
        z, t = 1e4 + torch.randn(N, V) * 2, 1e4 + torch.randn(N, V) * 2
    else:                   # spread of 1e4: extreme distributions
        z, t = torch.randn(N, V) * 1e4, torch.randn(N, V) * 1e4
    m = torch.ones(N)
    ce, tk, g = _compare(z, t, m, 10, grad_atol=1e-6)
    ce64, tk64 = R.distill_loss_oracle(z.double(), t.double(), m.double(), 10)
    torch.testing.assert_close(ce.double(), ce64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tk.double(), tk64, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g).all()


def test_padded_vocab_minus_inf():
    # -inf in both target and draft (a padded or disabled vocabulary entry): p = 0 there, the term counts 0
    _seed()
    N, V = 5, 400
    z, t = torch.randn(N, V), torch.randn(N, V)
    z[:, 300:] = float("-inf")
    t[:, 300:] = float("-inf")
    m = torch.ones(N)
    ce, tk, g = _losses_and_grad(ops.distill_loss, z, t, m, 10, 1.0, 0.5)
    ce0, tk0, g0 = _losses_and_grad(R.distill_loss_oracle, z[:, :300], t[:, :300], m, 10, 1.0, 0.5)
    torch.testing.assert_close(ce, ce0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tk, tk0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[:, :300], g0, rtol=1e-5, atol=1e-8)
    assert torch.all(g[:, 300:] == 0)


def test_nonfinite_unmasked_rows_propagate():
    z, t = torch.randn(3, 50), torch.randn(3, 50)
    t[1, 7] = float("nan")
    ce, tk = ops.distill_loss(z, t, torch.ones(3), 5)
    assert math.isnan(ce.item())


def test_separate_grad_outputs_and_determinism():
    _seed()
    z = torch.randn(11, 777, requires_grad=True)
    t = torch.randn(11, 777)
    m = (torch.rand(11) > 0.3).float()
    ce, tk = ops.distill_loss(z, t, m, 10)
    (g_ce,) = torch.autograd.grad(ce, z, retain_graph=True)   # grad of one output only (the other is None)
    (g_tk,) = torch.autograd.grad(tk, z)
    ce0, tk0 = R.distill_loss_oracle(z, t, m, 10)
    (r_ce,) = torch.autograd.grad(ce0, z, retain_graph=True)
    (r_tk,) = torch.autograd.grad(tk0, z)
    torch.testing.assert_close(g_ce, r_ce, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(g_tk, r_tk, rtol=1e-5, atol=1e-9)
    assert t.grad is None
    ce2, tk2 = ops.distill_loss(z, t, m, 10)
    assert torch.equal(ce, ce2) and torch.equal(tk, tk2)


def test_opcheck_and_compile():
    _seed()
    z, t = torch.randn(6, 130, requires_grad=True), torch.randn(6, 130)
    m = torch.tensor([1.0, 0, 1, 1, 0, 1])
    torch.library.opcheck(torch.ops.hass.distill_loss.default, (z, t, m, 10),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    st = torch.full((6, 2), float("-inf"))
    st[:, 1] = 0
    torch.library.opcheck(torch.ops.hass.online_softmax_chunk.default,
                          (t, st, torch.full((6, 3), float("-inf")), torch.full((6, 3), -1), 0, True),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(ops.distill_loss, fullgraph=True, backend="aot_eager")
    ce, tk = compiled(z, t, m, 10)
    ce0, tk0 = ops.distill_loss(z, t, m, 10)
    torch.testing.assert_close(ce, ce0)
    torch.testing.assert_close(tk, tk0)


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_inputs():
    z, t, m = torch.randn(4, 20), torch.randn(4, 20), torch.ones(4)
    with pytest.raises(ValueError, match="target_logits must have the shape"):
        ops.distill_loss(z, t[:, :19], m)
    with pytest.raises(ValueError, match="draft_logits must have dtype"):
        ops.distill_loss(z.long(), t, m)
    with pytest.raises(ValueError, match="draft_logits must be \\[..., V\\]"):
        ops.distill_loss(z[0], t[0], m[0])
    with pytest.raises(ValueError, match="topk must be an int in \\[1, min\\(64, vocab size 20\\)\\]"):
        ops.distill_loss(z, t, m, 21)
    with pytest.raises(ValueError, match="topk must be an int"):
        ops.distill_loss(torch.randn(2, 100), torch.randn(2, 100), torch.ones(2), 65)
    with pytest.raises(ValueError, match="topk must be an int"):
        ops.distill_loss(z, t, m, 0)
    with pytest.raises(ValueError, match="loss_mask must have shape \\(4,\\)"):
        ops.distill_loss(z, t, torch.ones(5))
    with pytest.raises(ValueError, match="loss_mask is an integer mask and must hold only 0 and 1, got values \\[2\\]"):
        ops.distill_loss(z, t, torch.tensor([1, 0, 2, 1]))
    with pytest.raises(ValueError, match="loss_mask is an integer mask .* got values \\[-1\\]"):
        ops.distill_loss(z, t, torch.tensor([1, 0, -1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="loss_mask must be a float, integer or bool"):
        ops.distill_loss(z, t, torch.ones(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="empty vocabulary"):
        ops.distill_loss(torch.randn(4, 0), torch.randn(4, 0), m)
    w = torch.randn(20, 8)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="lm_head_weight requires grad"):
        ops.fused_linear_distill_loss(x, x, w.requires_grad_(), m)
    w = w.detach()
    with pytest.raises(ValueError, match="draft_hidden must be \\[..., H\\] with H = lm_head_weight.shape\\[1\\] = 8"):
        ops.fused_linear_distill_loss(torch.randn(4, 9), x, w, m)
    with pytest.raises(ValueError, match="needs target_hidden or target_stats"):
        ops.fused_linear_distill_loss(x, None, w, m)
    stats = ops.distill_target_stats(x, w, topk=5)
    with pytest.raises(ValueError, match="target_stats was computed for"):
        ops.fused_linear_distill_loss(torch.randn(3, 8), None, w, torch.ones(3), topk=5, target_stats=stats)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ops.fused_linear_distill_loss(x, x, w, m, chunk_size=0)


# ---- online softmax chunks (the fused-linear building block) ------------------------------------------------

def test_online_softmax_chunk_matches_full_row():
    _seed()
    N, V, K = 6, 1000, 12
    x = torch.randn(N, V).bfloat16().float()  # ties across chunks
    x[2, 500:520] = x[2].max()                # a tie for the maximum spanning a chunk border
    st = torch.full((N, 2), float("-inf"))
    st[:, 1] = 0
    val, idx = torch.full((N, K), float("-inf")), torch.full((N, K), -1)
    for c0 in range(0, V, 137):
        e, alpha, st, val, idx = torch.ops.hass.online_softmax_chunk(x[:, c0:c0 + 137], st, val, idx, c0, True)
        torch.testing.assert_close(e, torch.exp(x[:, c0:c0 + 137] - st[:, :1]), rtol=2e-7, atol=0)
    torch.testing.assert_close(st[:, 0] + st[:, 1].log(), torch.logsumexp(x, -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(idx, R.distill_topk_indices(x, K))
    assert torch.equal(val, x.gather(1, idx))


# ---- fused linear --------------------------------------------------------------------------------------------

def _fused_run(fn, x, y, w, m, k, ce_w, topk_w, coef, **kw):
    x1 = x.detach().clone().requires_grad_(True)
    out = fn(x1, y, w, m, topk=k, ce_weight=ce_w, topk_weight=topk_w, **kw)
    (g,) = torch.autograd.grad(sum(c * o for c, o in zip(coef, out)), x1)
    return [o.detach() for o in out], g


def _fused_compare(x, y, w, m, k, chunk, *, ce_w=0.1, topk_w=1.0, stats=None, y_hidden=None):
    """fp32: the fused op equals the oracle to 1e-5. Low precision: the fused op must be at least as close to
    the exact (float64) result as the oracle run in that precision (up to a factor 2)."""
    coef = [float(c) for c in torch.rand(3)]
    y_ref = y if y_hidden is None else y_hidden
    out, g = _fused_run(ops.fused_linear_distill_loss, x, y, w, m, k, ce_w, topk_w, coef, target_stats=stats,
                        chunk_size=chunk)
    ref, g0 = _fused_run(R.fused_linear_distill_loss_oracle, x, y_ref, w, m, k, ce_w, topk_w, coef)
    assert g.dtype == x.dtype and g.shape == x.shape
    if w.dtype == torch.float32:
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-6 * float(g0.abs().max()))
        return out, g
    exact, g64 = _fused_run(R.fused_linear_distill_loss_oracle, x.double(), y_ref.double(), w.double(), m, k,
                            ce_w, topk_w, coef)
    for o, r, e in zip(out, ref, exact):
        assert abs(o.double() - e) <= 2 * abs(r.double() - e) + 1e-4 * abs(e), (o, r, e)
    err, err_ref = (g.double() - g64).abs().max(), (g0.double() - g64).abs().max()
    assert err <= 2 * err_ref + 1e-3 * g64.abs().max(), (err, err_ref)
    return out, g


@pytest.mark.parametrize("N,H,V,k,chunk", [(37, 24, 1000, 7, 128), (5, 16, 300, 64, 4096), (64, 32, 2500, 10, 999),
                                           (3, 8, 10, 10, 3)])
def test_fused_linear_fp32(N, H, V, k, chunk):
    _seed()
    w = torch.randn(V, H) / math.sqrt(H) * 4
    x, y = torch.randn(N, H), torch.randn(N, H)
    m = (torch.rand(N) > 0.3).float()
    _fused_compare(x, y, w, m, k, chunk)


def test_fused_linear_target_stats_reuse_and_no_grad():
    _seed()
    B, T, H, V = 2, 11, 32, 1500
    w = torch.randn(V, H) / math.sqrt(H) * 4
    y = torch.randn(B, T, H)
    m = torch.rand(B, T) > 0.3
    stats = ops.distill_target_stats(y, w, topk=10, chunk_size=512)
    assert torch.equal(stats.topk_idx, R.distill_topk_indices(y.reshape(-1, H) @ w.T, 10))
    for _ in range(3):  # J alignment steps: the draft changes, the target statistics are shared
        x = torch.randn(B, T, H)
        out, g = _fused_compare(x, None, w, m, 10, 512, stats=stats, ce_w=0.3, topk_w=0.7, y_hidden=y)
        with torch.no_grad():
            out2 = ops.fused_linear_distill_loss(x, y, w, m, topk=10, ce_weight=0.3, topk_weight=0.7,
                                                 chunk_size=512)
        for a_, b_ in zip(out, out2):
            torch.testing.assert_close(a_, b_, rtol=1e-6, atol=1e-7)
    assert g.shape == (B, T, H)


def test_fused_linear_all_masked_and_bf16():
    _seed()
    N, H, V = 20, 64, 3000
    w = (torch.randn(V, H) / 2).bfloat16()
    x, y = torch.randn(N, H).bfloat16(), torch.randn(N, H).bfloat16()
    x1 = x.clone().requires_grad_(True)
    out = ops.fused_linear_distill_loss(x1, y, w, torch.zeros(N), chunk_size=1024)
    out[0].backward()
    assert all(o.item() == 0.0 for o in out) and torch.all(x1.grad == 0)
    m = (torch.rand(N) > 0.2).float()
    _fused_compare(x, y, w, m, 10, 1024)


def test_fused_linear_ignores_autocast():
    # the GEMMs run in the head's dtype even inside an autocast region (documented behaviour)
    _seed()
    w, x, y = torch.randn(500, 16), torch.randn(9, 16), torch.randn(9, 16)
    m = torch.ones(9)
    plain = ops.fused_linear_distill_loss(x, y, w, m, chunk_size=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.fused_linear_distill_loss(x, y, w, m, chunk_size=128)
    for a_, b_ in zip(plain, auto):
        assert torch.equal(a_, b_)


def test_bench_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_distill_loss.py"), "--quick", "--out-dir",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_loss_quick.json").read_text())
    assert {(r["case"], r["variant"]) for r in res["rows"]} == {
        ("logits", "oracle"), ("logits", "ours"), ("fused", "oracle"), ("fused", "logits_op"), ("fused", "ours")}
    assert all(r["time_s"] > 0 for r in res["rows"]) and (tmp_path / "bench_loss_quick.md").exists()


# ---- CUDA against the CPU kernels ---------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext built with its CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,k", [(7, 1001, 10), (64, 128256, 10), (33, 49152, 64), (5, 33, 33), (4, 262144, 1)])
def test_cuda_matches_cpu(dtype, N, V, k):
    _seed()
    z, t = (torch.randn(N, V) * 3).to(dtype), (torch.randn(N, V) * 3).to(dtype)
    m = (torch.rand(N) > 0.25).float()
    w_ce, w_topk = 0.3, 1.1
    ce, tk, g = _losses_and_grad(ops.distill_loss, z, t, m, k, w_ce, w_topk)
    cz, ct, cm = z.cuda(), t.cuda(), m.cuda()
    ce_c, tk_c, g_c = _losses_and_grad(ops.distill_loss, cz, ct, cm, k, w_ce, w_topk)
    torch.testing.assert_close(ce_c.cpu(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tk_c.cpu(), tk, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(g_c.cpu().float(), g.float(), rtol=tol, atol=1e-6 * float(g.float().abs().max()))
    _, _, st, idx = torch.ops.hass.distill_loss(cz, ct, cm, k)
    _, _, st0, idx0 = torch.ops.hass.distill_loss(z, t, m, k)
    assert torch.equal(idx.cpu(), idx0)   # same top-K set and order, ties included


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext built with its CUDA kernels")
def test_cuda_edge_cases():
    z = torch.randn(6, 5000, device="cuda")
    t = torch.full((6, 5000), 0.5, device="cuda")  # all ties
    t[1] = 1e4 + torch.randn(5000, device="cuda")
    t[2, 100] = 80.0
    m = torch.tensor([1.0, 1, 1, 0, 1, 1], device="cuda")
    z[3] = float("nan")  # masked: never read
    ce, tk = ops.distill_loss(z, t, m, 16)
    ce0, tk0 = ops.distill_loss(z.cpu(), t.cpu(), m.cpu(), 16)
    torch.testing.assert_close(ce.cpu(), ce0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tk.cpu(), tk0, rtol=1e-5, atol=1e-6)
    zero = ops.distill_loss(z, t, torch.zeros(6, device="cuda"), 16)
    assert zero[0].item() == 0.0 and zero[1].item() == 0.0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext built with its CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_linear(dtype):
    _seed()
    N, H, V = 300, 128, 40000
    w = (torch.randn(V, H) / math.sqrt(H) * 4).to(dtype)
    x, y = torch.randn(N, H).to(dtype), torch.randn(N, H).to(dtype)
    m = (torch.rand(N) > 0.3).float()
    st = ops.distill_target_stats(y.cuda(), w.cuda(), 10, chunk_size=4096)
    st0 = ops.distill_target_stats(y, w, 10, chunk_size=4096)
    if dtype == torch.float32:
        assert (st.topk_idx.cpu() == st0.topk_idx).float().mean() > 0.99  # GEMM rounding may swap near-ties
    xc = x.cuda().requires_grad_(True)
    out = ops.fused_linear_distill_loss(xc, y.cuda(), w.cuda(), m.cuda(), chunk_size=4096)
    out[0].backward()
    xr = x.cuda().float().requires_grad_(True)
    ref = R.fused_linear_distill_loss_oracle(xr, y.cuda().float(), w.cuda().float(), m.cuda())
    ref[0].backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=tol, atol=1e-5)
    torch.testing.assert_close(xc.grad.float(), xr.grad, rtol=tol, atol=tol * float(xr.grad.abs().max()))
