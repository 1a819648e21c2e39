"""The CUDA kernel of torch.ops.hass.small_linear: a row's result is bit-identical whatever M is and wherever the
row sits (what lossless greedy speculative decoding needs), agreement with the fp32 product, strided and
misaligned weights (the scalar-load path gives the same bits as the 16-byte one), bias dtypes, empty sizes, K tails
and bad input. Skipped without a CUDA device and hass_ext's CUDA kernels."""
import pytest
import torch

import hass_ext

CUDA = torch.cuda.is_available() and "cuda" in hass_ext.available_devices()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# |y - ref| <= atol + rtol |ref|: the result is rounded to x's dtype once, the sum itself is fp32
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()


def reference(x, w, b=None):
    """float64 on the CPU of the widened operands (no TF32, no reduced-precision reduction)."""
    y = x.double().cpu() @ w.double().cpu().T
    return y + b.double().cpu() if b is not None else y


def assert_matches_reference(y, x, w, b=None):
    rtol, atol = TOL[x.dtype]
    ref = reference(x, w, b)
    assert y.dtype == x.dtype and y.device == x.device
    torch.testing.assert_close(y.double().cpu(), ref, rtol=rtol, atol=atol * ref.abs().max().item())


def small_linear(x, w, b=None):
    """The raw op (hass_ext.ops.small_linear is the CPU entry point)."""
    with torch.inference_mode():
        return torch.ops.hass.small_linear(x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1024, 1003])  # whole 16-byte chunks; a partial last chunk (scalar loads)
def test_cuda_rows_do_not_depend_on_m_or_position(dtype, K):
    gen = torch.Generator().manual_seed(K)
    N, M = 77, 64  # N not a multiple of the rows per CTA
    x, w = rand(M, K, dtype=dtype, gen=gen), rand(N, K, dtype=dtype, gen=gen, scale=0.05)
    b = rand(N, dtype=dtype, gen=gen)
    full = small_linear(x, w, b)
    assert_matches_reference(full, x, w, b)
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 33, 60, 63):  # every M-tile size and partial tiles
        assert torch.equal(small_linear(x[:m], w, b), full[:m]), f"M = {m}"
    for j in (0, 5, 8, 37, 59, 63):  # one row alone, and the same row at another position of a larger call
        assert torch.equal(small_linear(x[j:j + 1], w, b), full[j:j + 1]), f"row {j}"
    for j in (1, 3, 4):  # rows shifted to other positions inside a tile and other tiles
        assert torch.equal(small_linear(x[j:j + 60], w, b), full[j:j + 60]), f"rows {j}.."
    perm = torch.randperm(M, generator=gen).cuda()
    assert torch.equal(small_linear(x[perm], w, b), full[perm])
    assert torch.equal(small_linear(torch.cat([x, x[:3]]), w, b)[M:], full[:3])  # M = 67: past 64 rows


@pytest.mark.parametrize("xdtype", DTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
def test_cuda_matches_fp32_product_every_dtype_pair(xdtype, wdtype):
    gen = torch.Generator().manual_seed(7)
    x, w = rand(2, 3, 512, dtype=xdtype, gen=gen), rand(200, 512, dtype=wdtype, gen=gen, scale=0.05)
    y = small_linear(x, w)
    assert y.shape == (2, 3, 200)
    assert_matches_reference(y.reshape(6, 200), x.reshape(6, 512), w)
    # the sum is that of the widened operands: an fp32 weight holding the same values gives the same bits
    assert torch.equal(y, small_linear(x, w.float()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_strided_and_misaligned_weight_give_the_same_bits(dtype):
    gen = torch.Generator().manual_seed(3)
    N, K = 50, 1000
    x = rand(9, K, dtype=dtype, gen=gen)
    big = rand(N, K + 24, dtype=dtype, gen=gen, scale=0.05)
    want = small_linear(x, big[:, 8:8 + K].contiguous())
    assert_matches_reference(want, x, big[:, 8:8 + K])
    for w in (big[:, :K], big[:, 8:8 + K],  # strided rows, 16-byte aligned: vector loads
              big[:, 1:1 + K], big[:, 3:3 + K],  # misaligned starts: scalar loads
              big[::2, 8:8 + K]):  # every other row
        assert torch.equal(small_linear(x, w), small_linear(x, w.contiguous()))
    assert torch.equal(small_linear(x, big[:, 8:8 + K]), want)
    # a misaligned x (a column slice) and a transposed one are read correctly too, with the same bits
    xbig = rand(9, K + 1, dtype=dtype, gen=gen)
    xs = xbig[:, 1:]
    assert torch.equal(small_linear(xs, big[:, :K]), small_linear(xs.contiguous(), big[:, :K].contiguous()))
    xt = x.T.contiguous().T
    assert not xt.is_contiguous()
    assert torch.equal(small_linear(xt, big[:, :K]), small_linear(x, big[:, :K]))


@pytest.mark.parametrize("bdtype", DTYPES)
def test_cuda_bias_dtypes(bdtype):
    gen = torch.Generator().manual_seed(5)
    x, w = rand(4, 256, dtype=torch.bfloat16, gen=gen), rand(40, 256, dtype=torch.bfloat16, gen=gen, scale=0.05)
    b = rand(40, dtype=bdtype, gen=gen)
    y = small_linear(x, w, b)
    assert_matches_reference(y, x, w, b)
    assert torch.equal(y, small_linear(x, w, b.float()))  # the bias is widened exactly
    # a strided bias
    bb = rand(80, dtype=bdtype, gen=gen)
    assert torch.equal(small_linear(x, w, bb[::2]), small_linear(x, w, bb[::2].contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_empty_sizes(dtype):
    gen = torch.Generator().manual_seed(1)
    w, b = rand(6, 16, dtype=dtype, gen=gen), rand(6, dtype=dtype, gen=gen)
    y = small_linear(rand(0, 16, dtype=dtype, gen=gen), w, b)
    assert y.shape == (0, 6) and y.dtype == dtype and y.is_cuda
    y = small_linear(rand(3, 16, dtype=dtype, gen=gen), w[:0], b[:0])
    assert y.shape == (3, 0)
    x0, w0 = rand(3, 0, dtype=dtype, gen=gen), rand(6, 0, dtype=dtype, gen=gen)
    assert torch.equal(small_linear(x0, w0, b), b.expand(3, 6))  # an empty sum: the bias
    y = small_linear(x0, w0)
    assert torch.equal(y, torch.zeros(3, 6, dtype=dtype, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 5, 8, 9, 255, 257, 263])
def test_cuda_k_tails(dtype, K):
    gen = torch.Generator().manual_seed(K)
    x, w = rand(11, K, dtype=dtype, gen=gen), rand(19, K, dtype=dtype, gen=gen, scale=0.3)
    b = rand(19, dtype=dtype, gen=gen)
    y = small_linear(x, w, b)
    assert_matches_reference(y, x, w, b)
    for m in (1, 2, 5):
        assert torch.equal(small_linear(x[m:m + 1], w, b), y[m:m + 1])
    # rows padded to a multiple of 16 bytes: whole chunks with vector loads, the tail with scalar ones; the same bits
    pad = -K % 8
    xw = torch.zeros(11, K + pad, dtype=dtype, device="cuda")
    ww = torch.zeros(19, K + pad, dtype=dtype, device="cuda")
    xw[:, :K], ww[:, :K] = x, w
    assert torch.equal(small_linear(xw[:, :K], ww[:, :K], b), y)


def test_cuda_llama_shape_bf16_rows_invariant():
    gen = torch.Generator().manual_seed(11)
    x, w = rand(60, 4096, dtype=torch.bfloat16, gen=gen), rand(1024, 4096, dtype=torch.bfloat16, gen=gen, scale=0.02)
    full = small_linear(x, w)
    assert_matches_reference(full, x, w)
    one = torch.cat([small_linear(x[j:j + 1], w) for j in range(60)])
    assert torch.equal(one, full)


def test_cuda_bad_inputs():
    gen = torch.Generator().manual_seed(2)
    x, w = rand(2, 16, dtype=torch.float32, gen=gen), rand(4, 16, dtype=torch.float32, gen=gen)
    with pytest.raises(RuntimeError, match="small_linear: weight must be on x's device"):
        small_linear(x.cpu(), w)
    with pytest.raises(RuntimeError, match="small_linear: weight must be on x's device"):
        small_linear(x, w.cpu())
    with pytest.raises(RuntimeError, match="small_linear: bias must be on x's device"):
        small_linear(x, w, torch.zeros(4))
    with pytest.raises(RuntimeError, match="small_linear: x must have dtype"):
        small_linear(x.to(torch.int32), w)
    with pytest.raises(RuntimeError, match="small_linear: x must be"):
        small_linear(rand(2, 15, dtype=torch.float32, gen=gen), w)
    with pytest.raises(RuntimeError, match="small_linear: bias must be"):
        small_linear(x, w, rand(5, dtype=torch.float32, gen=gen))
    big_k = 2 ** 31 // 8  # zero rows: no memory, only the shape check
    with pytest.raises(RuntimeError, match="small_linear: the CUDA kernel takes K <= "):
        small_linear(torch.empty(0, big_k, device="cuda"), torch.empty(0, big_k, device="cuda"))
    with pytest.raises(RuntimeError, match="small_linear has no backward"):
        torch.ops.hass.small_linear(x.requires_grad_(), w, None)
