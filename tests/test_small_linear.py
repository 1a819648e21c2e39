"""small_linear against a float64 oracle; a row's result does not depend on the other rows; the nn.Linear swap."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hass_ext
from hass_ext import ops
from hass_ext.ops.small_linear import MAX_ROWS, SmallLinear, as_exact_bf16, linear, row_invariant, use_blas_linear

from tiny_models import tiny_target


def _oracle(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double()).float()


@pytest.mark.parametrize("K", [1, 15, 16, 17, 576, 1537])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_oracle_and_rows_are_independent(K, with_bias):
    gen = torch.Generator().manual_seed(K)
    for N in (1, 5, 67):
        w = torch.randn(N, K, generator=gen)
        b = torch.randn(N, generator=gen) if with_bias else None
        for M in (1, 2, 3, 4, 5, 8, 13, 16, 64):
            x = torch.randn(M, K, generator=gen)
            y = ops.small_linear(x, w, b)
            assert y.shape == (M, N) and y.dtype == torch.float32
            torch.testing.assert_close(y, _oracle(x, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)
            alone = torch.cat([ops.small_linear(x[i:i + 1], w, b) for i in range(M)])
            assert torch.equal(y, alone), f"rows depend on their batch (M={M}, N={N}, K={K})"


def test_leading_dims_strides_and_threads():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 96, generator=gen)
    x = torch.randn(2, 3, 96, generator=gen)
    y = ops.small_linear(x, w)
    assert y.shape == (2, 3, 300)
    torch.testing.assert_close(y, _oracle(x, w, None), rtol=1e-5, atol=1e-4)
    wide = torch.randn(4, 2 * 96, generator=gen)[:, ::2]  # non-contiguous x
    assert torch.equal(ops.small_linear(wide, w), ops.small_linear(wide.contiguous(), w))
    wt = torch.randn(96, 300, generator=gen).t()  # transposed weight (column-major)
    assert torch.equal(ops.small_linear(x, wt), ops.small_linear(x, wt.contiguous()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.small_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y), "the result depends on the number of threads"
    assert ops.small_linear(torch.randn(0, 96), w).shape == (0, 300)


@pytest.mark.parametrize("K", [7, 16, 33, 576])
def test_bf16_weight_is_widened_exactly(K):
    gen = torch.Generator().manual_seed(K)
    w = torch.randn(37, K, generator=gen).bfloat16()
    b = torch.randn(37, generator=gen)
    for M in (1, 3, 8):
        x = torch.randn(M, K, generator=gen)
        y = ops.small_linear(x, w, b)
        assert y.dtype == torch.float32 and torch.equal(y, ops.small_linear(x, w.float(), b))
    wt = torch.randn(K, 37, generator=gen).bfloat16().t()  # strided bf16 weight
    assert torch.equal(ops.small_linear(x, wt), ops.small_linear(x, wt.float()))


def test_large_logits_stay_exact():
    w = torch.full((3, 40), 1e4)
    x = torch.ones(2, 40)
    assert torch.equal(ops.small_linear(x, w), torch.full((2, 3), 4e5))


def test_bad_input_names_the_argument():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="x must have dtype"):
        ops.small_linear(torch.randn(2, 16, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="weight must have dtype"):
        ops.small_linear(torch.randn(2, 16), w.double())
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        ops.small_linear(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="bias must have 8 entries"):
        ops.small_linear(torch.randn(2, 16), w, torch.randn(7))
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        ops.small_linear(torch.randn(2, 16), torch.randn(8))
    with pytest.raises(ValueError, match="no backward"):
        ops.small_linear(torch.randn(2, 16, requires_grad=True), w)


def test_linear_dispatch():
    w = torch.randn(8, 16)
    small = torch.randn(MAX_ROWS, 16)
    big = torch.randn(MAX_ROWS + 1, 16)
    with torch.no_grad():
        assert torch.equal(linear(small, w), ops.small_linear(small, w))
        assert torch.equal(linear(big, w), F.linear(big, w))  # prefill-sized: BLAS
        xb, wb = small.bfloat16(), w.bfloat16()
        assert torch.equal(linear(xb, wb), ops.small_linear(xb, wb))  # 16-bit: the op too
        assert torch.equal(linear(small.double(), w.double()), F.linear(small.double(), w.double()))  # float64
        with row_invariant():  # any number of rows
            assert torch.equal(linear(big, w), ops.small_linear(big, w))
    x = torch.randn(3, 16, requires_grad=True)  # training: torch's linear, with its backward
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1))


def test_model_swap_keeps_outputs_state_and_training():
    target = tiny_target("qwen2", vocab=64, hidden=48, layers=2, heads=4, kv_heads=2)  # qkv biases
    model = target.model
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids).logits
        n = hass_ext.use_small_linear(model)
        after = model(ids).logits
    assert n == sum(1 for m in model.modules() if isinstance(m, nn.Linear)) and n > 0
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids).logits.float().pow(2).mean().backward()  # grad mode: torch's linear, gradients flow
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() == 2)
    assert hass_ext.use_blas_linear(model) == n
    assert all(type(m) is not SmallLinear for m in model.modules())


def test_default_cpu_target_uses_it():
    target = hass_ext.load_target()
    layers = [m for m in target.model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(type(m) is SmallLinear for m in layers)
    plain = hass_ext.load_target(small_batch_linear=False)
    assert all(type(m) is nn.Linear for m in plain.model.modules() if isinstance(m, nn.Linear))
    draft = hass_ext.init_draft(target)
    assert all(type(m) is SmallLinear for m in draft.modules() if isinstance(m, nn.Linear))


def test_exact_bf16_weights_are_streamed_as_bf16():
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.bfloat16().float())  # bf16 values held in fp32 (a draft loaded from bf16)
    x = torch.randn(3, 40)
    with torch.no_grad():
        want = ops.small_linear(x, lin.weight, lin.bias)
        hass_ext.use_small_linear(lin, exact_bf16=True)
        assert torch.equal(lin(x), want)
        assert lin._bf16_copy[2].dtype == torch.bfloat16  # the copy is what was streamed
        lin.weight.add_(1e-3)  # no longer bf16 values: the fp32 weight again, no stale copy
        assert lin._bf16_copy[2] is not None and torch.equal(lin(x), ops.small_linear(x, lin.weight, lin.bias))
        assert lin._bf16_copy[2] is None
        lin.weight.data = torch.ones(24, 40)  # new storage, version counter untouched: a new copy all the same
        assert torch.equal(lin(x), ops.small_linear(x, torch.ones(24, 40), lin.bias))
    assert as_exact_bf16(torch.tensor([1.0, 1.0 + 2 ** -10])) is None
    assert hass_ext.use_blas_linear(lin) == 1 and "_bf16_copy" not in lin.__dict__


def test_draft_layers_stream_bf16_copies():
    from hass_ext.draft import init_draft
    target = tiny_target("llama", vocab=64, hidden=48, layers=2, heads=4, kv_heads=2)
    draft = init_draft(target)
    for m in draft.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(m.weight.bfloat16().float())
    ids, feats = torch.randint(0, 64, (1, 5)), torch.randn(1, 5, 48)
    with torch.no_grad():
        got = draft(ids, feats)
        use_blas_linear(draft)  # plain fp32 nn.Linear
        hass_ext.use_small_linear(draft)
        torch.testing.assert_close(draft(ids, feats), got, rtol=0, atol=0)


# ---- 16-bit inputs: the same row-invariant sums, rounded once --------------------------------------------------

DTYPES16 = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("xdtype", DTYPES16 + [torch.float32])
@pytest.mark.parametrize("wdtype", DTYPES16 + [torch.float32])
def test_16bit_rows_are_independent_and_rounded_once(xdtype, wdtype):
    """y = round_to(x.dtype)(fp32 sum of the widened operands + bias): a row's bits are the same for M = 1 and at
    any position of M = 2..64, and equal the fp32 kernel on the widened operands, rounded."""
    gen = torch.Generator().manual_seed(7)
    K, N = 203, 70  # a K tail past the 16-lane blocks
    w = (torch.randn(N, K, generator=gen) * 0.2).to(wdtype)
    b = torch.randn(N, generator=gen).to(xdtype)
    x = torch.randn(64, K, generator=gen).to(xdtype)
    y = ops.small_linear(x, w, b)
    assert y.dtype == xdtype and y.shape == (64, N)
    assert torch.equal(y, ops.small_linear(x.float(), w.float(), b.float()).to(xdtype))
    torch.testing.assert_close(y.float(), _oracle(x.float(), w.float(), b.float()),
                               rtol=2e-2 if xdtype != torch.float32 else 1e-5, atol=1e-2)
    for M in (1, 2, 7, 60, 64):
        part = ops.small_linear(x[64 - M:], w, b)
        assert torch.equal(part, y[64 - M:]), f"rows depend on M={M}"
    alone = torch.cat([ops.small_linear(x[i:i + 1], w, b) for i in range(64)])
    assert torch.equal(alone, y)


def test_fp16_weight_is_widened_exactly():
    """Every finite float16 bit pattern, subnormals included, enters the sum as its exact fp32 value."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(-1, 16)
    w = bits[torch.isfinite(bits).all(1)]
    y = ops.small_linear(torch.eye(16), w)  # y[i, n] = w[n, i] (plus exact zeros)
    assert torch.equal(y, w.float().t())
    assert (w.float().abs() < 6.2e-5).sum() > 1000  # the subnormal range was covered


def test_default_cpu_targets_of_every_dtype_use_it():
    for dtype in (torch.bfloat16, torch.float16):
        target = hass_ext.load_target(dtype=dtype)
        layers = [m for m in target.model.modules() if isinstance(m, nn.Linear)]
        assert layers and all(type(m) is SmallLinear for m in layers)
        with torch.inference_mode():
            x = torch.randn(3, target.config.hidden_size, dtype=dtype)
            lm = target.model.lm_head
            assert torch.equal(lm(x), ops.small_linear(x, lm.weight))
