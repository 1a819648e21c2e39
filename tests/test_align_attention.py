"""hass_ext.ops.align_attention (forward + autograd backward) against the explicit-mask oracle."""
import pytest
import torch

import hass_ext  # noqa: F401
from hass_ext import ops
from hass_ext.oracles import align_attention_oracle, align_masks

CUDA = torch.cuda.is_available() and "cuda" in hass_ext.available_devices()

# The HASS alignment table for L = 6, J = 3: T = target stream (level 0), D1/D2 = draft streams (levels 1, 2).
TABLE = {
    1: ["T . . . . .", "T T . . . .", "T T T . . .", "T T T T . .", "T T T T T .", "T T T T T T"],
    2: ["D1 . . . . .", "T D1 . . . .", "T T D1 . . .", "T T T D1 . .", "T T T T D1 .", "T T T T T D1"],
    3: ["D2 . . . . .", "D1 D2 . . . .", "T D1 D2 . . .", "T T D1 D2 . .", "T T T D1 D2 .", "T T T T D1 D2"],
}


def test_masks_match_hass_table():
    for F, rows in TABLE.items():
        masks = align_masks(6, F)
        for t, row in enumerate(rows):
            for c, cell in enumerate(row.split()):
                level = None if cell == "." else (0 if cell == "T" else int(cell[1:]))
                got = [i for i in range(F) if masks[i, t, c]]
                assert got == ([] if level is None else [level]), (F, t, c)


@pytest.mark.parametrize("T, F", [(6, 3), (9, 1), (10, 4), (2, 4)])
def test_masks_match_hass_construction(T, F):
    # The HASS code's construction: level 0 = tril(ones(T-F+1)) at rows F-1.., level i = eye(T-F+i+1) at rows F-i-1..
    want = torch.zeros(F, T, T, dtype=torch.bool)
    if T - F + 1 > 0:
        want[0, F - 1:, :T - F + 1] = torch.tril(torch.ones(T - F + 1, T - F + 1, dtype=torch.bool))
    for i in range(1, F):
        size = T - F + i + 1
        if size > 0:
            want[i, F - i - 1:, :size] = torch.eye(size, dtype=torch.bool)
    assert torch.equal(align_masks(T, F), want)
    assert torch.equal(want.sum(0), torch.tril(torch.ones(T, T, dtype=torch.long)))  # disjoint, cover c <= t


def rand_inputs(B, Hq, Hkv, T, F, d, dtype, gen, device="cpu"):
    q = torch.randn(B, Hq, T, d, generator=gen).to(device, dtype)
    k = torch.randn(F, B, Hkv, T, d, generator=gen).to(device, dtype)
    v = torch.randn(F, B, Hkv, T, d, generator=gen).to(device, dtype)
    return q, k, v


def run_both(q, k, v, semantics="proper", scale=None, gen=None):
    """Output and q/k/v gradients of the op and of the float64 oracle for one random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = ops.align_attention(*leaves, scale=scale, semantics=semantics)
    go = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    out.backward(go)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref = align_attention_oracle(*ref_leaves, scale=scale, semantics=semantics)
    ref.backward(go.cpu().double())
    return [out] + [x.grad for x in leaves], [ref] + [x.grad for x in ref_leaves]


def assert_close(got, want, dtype, what):
    got, want = got.detach().cpu().double(), want.detach().double()
    err = (got - want).abs().max().item()
    mag = max(want.abs().max().item(), 0.1)  # floor: some gradients vanish analytically (e.g. T = F = 1)
    if dtype == torch.float32:
        assert err / mag < 1e-5, f"{what}: fp32 relative error {err / mag:.3g}"
    else:
        assert err / mag < 3e-2, f"{what}: {dtype} relative error {err / mag:.3g}"


NAMES = ("out", "dq", "dk_levels", "dv_levels")


@pytest.mark.parametrize("F", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 2, 3, 37, 300])
def test_fp32_forward_backward(F, T):
    gen = torch.Generator().manual_seed(100 * F + T)
    gqa = (1, 3, 4)[(F + T) % 3]
    q, k, v = rand_inputs(2 if T < 300 else 1, 2 * gqa, 2, T, F, 16, torch.float32, gen)
    for got, want, name in zip(*run_both(q, k, v, gen=gen), NAMES):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("F, T", [(1, 9), (2, 1), (3, 2), (3, 40), (4, 123)])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_reference_semantics(F, T, gqa):
    gen = torch.Generator().manual_seed(7 * F + T + gqa)
    q, k, v = rand_inputs(2, gqa, 1, T, F, 8, torch.float32, gen)
    for got, want, name in zip(*run_both(q, k, v, semantics="reference", scale=0.7, gen=gen), NAMES):
        assert_close(got, want, torch.float32, name)
    # The leak is real: the reference weights of early rows sum to well below 1, unlike the proper softmax.
    if T > 4:
        ones = torch.ones_like(v)
        out = ops.align_attention(q, k, ones, semantics="reference")
        assert out[..., 0, 0].max() < 0.9 and torch.allclose(ops.align_attention(q, k, ones)[..., 0], torch.ones(()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_half_precision(dtype, d):
    gen = torch.Generator().manual_seed(d)
    q, k, v = rand_inputs(1, 4, 1, 70, 3, d, dtype, gen)
    got, want = run_both(q, k, v, gen=gen)
    for g_, w_, name in zip(got, want, NAMES):
        assert g_.dtype == dtype
        assert_close(g_, w_, dtype, name)


def test_level_lists_and_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    F, T = 3, 21
    q = torch.randn(2, T, 4, 16, generator=gen).transpose(1, 2)  # [B, H, T, d] as a transposed view
    ks = [torch.randn(2, T, 2, 16, generator=gen).transpose(1, 2) for _ in range(F)]
    vs = [torch.randn(2, T, 2, 16, generator=gen).transpose(1, 2) for _ in range(F)]
    out = ops.align_attention(q, ks, vs)
    ref = align_attention_oracle(q.double(), torch.stack(ks).double(), torch.stack(vs).double())
    assert_close(out, ref, torch.float32, "out")


def test_right_padding_is_safe():
    # Positions >= length are padding: whatever they hold, the real positions' outputs and gradients are unchanged.
    gen = torch.Generator().manual_seed(9)
    F, T, length = 3, 30, 19
    q, k, v = rand_inputs(1, 2, 1, T, F, 16, torch.float32, gen)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[..., length:, :] = 50.0
    k2[..., length:, :] = -30.0
    v2[..., length:, :] = 1e3
    outs = []
    for args in ((q, k, v), (q2, k2, v2)):
        leaves = [x.clone().requires_grad_() for x in args]
        out = ops.align_attention(*leaves)
        out[..., :length, :].sum().backward()  # the loss only covers real positions
        outs.append([out[..., :length, :]] + [x.grad[..., :length, :] for x in leaves])
    for a, b, name in zip(*outs, NAMES):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_fake_and_autograd_registration():
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand_inputs(1, 2, 1, 5, 2, 8, torch.float32, gen)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.hass.align_attention.default, (q, k, v, 0.3, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("bad, match", [
    (dict(v_levels=torch.zeros(3, 1, 2, 7, 8)), "k_levels and v_levels must have the same shape"),
    (dict(k_levels=torch.zeros(2, 1, 3, 7, 8), v_levels=torch.zeros(2, 1, 3, 7, 8)), "multiple of the key/value"),
    (dict(k_levels=torch.zeros(2, 1, 2, 6, 8), v_levels=torch.zeros(2, 1, 2, 6, 8)), "T=7"),
    (dict(k_levels=torch.zeros(0, 1, 2, 7, 8), v_levels=torch.zeros(0, 1, 2, 7, 8)), "at least one level"),
    (dict(k_levels=torch.zeros(1, 2, 7, 8), v_levels=torch.zeros(1, 2, 7, 8)), "k_levels must have 5 dims"),
    (dict(q=torch.zeros(1, 4, 7, 8, dtype=torch.float64)), "q must have dtype"),
    (dict(semantics="leaky"), "semantics must be one of"),
])
def test_bad_inputs(bad, match):
    args = dict(q=torch.zeros(1, 4, 7, 8), k_levels=torch.zeros(2, 1, 2, 7, 8), v_levels=torch.zeros(2, 1, 2, 7, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.align_attention(**args)


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("shape", [(1, 4, 1, 300, 3), (2, 6, 2, 2, 4), (1, 3, 3, 129, 1), (1, 8, 2, 77, 2)])
@pytest.mark.parametrize("semantics", ops.ALIGN_ATTENTION_MODES)
def test_cuda_matches_oracle(dtype, d, shape, semantics):
    B, Hq, Hkv, T, F = shape
    gen = torch.Generator().manual_seed(T + F + d)
    q, k, v = rand_inputs(B, Hq, Hkv, T, F, d, dtype, gen, device="cuda")
    got, want = run_both(q, k, v, semantics=semantics, gen=gen)
    for g_, w_, name in zip(got, want, NAMES):
        assert g_.is_cuda and g_.dtype == dtype
        assert_close(g_, w_, dtype, name)


# T < F: no query row sees a level-0 key, so every row's keys are diagonal keys only (the CUDA kernels then skip
# their level-0 tile loop entirely). Run on the CPU too, so the oracle comparison of these shapes runs everywhere.
SHORT_SHAPES = [(1, 4, 1, 1, 2), (2, 8, 2, 3, 4), (1, 4, 4, 2, 5), (1, 6, 2, 63, 64)]


@pytest.mark.parametrize("semantics", ["proper", "reference"])
@pytest.mark.parametrize("shape", SHORT_SHAPES)
def test_cpu_fewer_positions_than_levels(shape, semantics):
    B, Hq, Hkv, T, F = shape
    gen = torch.Generator().manual_seed(11 * T + F)
    q, k, v = rand_inputs(B, Hq, Hkv, T, F, 16, torch.float32, gen)
    for got, want, name in zip(*run_both(q, k, v, semantics=semantics, gen=gen), NAMES):
        assert_close(got, want, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("shape", SHORT_SHAPES)
@pytest.mark.parametrize("semantics", ["proper", "reference"])
def test_cuda_fewer_positions_than_levels(dtype, d, shape, semantics):
    B, Hq, Hkv, T, F = shape
    for trial in range(3):  # a missing barrier shows as an error that moves between runs
        gen = torch.Generator().manual_seed(1000 * trial + 11 * T + F + d)
        q, k, v = rand_inputs(B, Hq, Hkv, T, F, d, dtype, gen, device="cuda")
        got, want = run_both(q, k, v, semantics=semantics, gen=gen)
        for g_, w_, name in zip(got, want, NAMES):
            assert g_.is_cuda and g_.dtype == dtype
            assert_close(g_, w_, dtype, f"{name} (trial {trial})")
