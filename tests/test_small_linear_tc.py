"""small_linear_tc, the tensor-core form of small_linear: on the CPU it is small_linear; on CUDA (skipped here) a
row's result is bit-identical whatever M is and wherever the row sits, it matches the float64 product, unaligned
or strided operands give the same bits, and a bf16 target routed through it decodes speculatively token for token
as it decodes alone."""
import pytest
import torch

import hass_ext
from hass_ext.ops import small_linear, small_linear_tc, use_small_linear
from hass_ext.ops.small_linear import SmallLinear

DTYPES = [torch.bfloat16, torch.float16]
CUDA = torch.cuda.is_available() and "cuda" in hass_ext.available_devices()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")


def rand(*shape, dtype, gen, scale=1.0, device="cpu"):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_is_small_linear(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w, b = rand(2, 7, 64, dtype=dtype, gen=gen), rand(33, 64, dtype=dtype, gen=gen), rand(33, dtype=dtype, gen=gen)
    with torch.inference_mode():
        assert torch.equal(small_linear_tc(x, w, b), small_linear(x, w, b))
        assert torch.equal(small_linear_tc(x, w), small_linear(x, w))


def test_bad_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(1)
    x, w = rand(3, 16, dtype=torch.bfloat16, gen=gen), rand(4, 16, dtype=torch.bfloat16, gen=gen)
    cases = [((x.float(), w), "x must have dtype"), ((x, w.half()), "weight must have dtype torch.bfloat16"),
             ((x[:, :12], w[:, :12]), "multiple of 8"), ((x, w[:, :8]), r"x must be \[..., 8\]"),
             ((x, w, torch.zeros(3)), "bias must have 4 entries")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            small_linear_tc(*args)
    with pytest.raises(ValueError, match="small_linear_tc has no backward"):
        small_linear_tc(x, w.clone().requires_grad_())


def test_small_linear_layers_take_it_only_on_cuda():
    """use_small_linear(tensor_cores=True) marks the layers; on the CPU they still call small_linear (the same op
    there), and use_blas_linear undoes the mark."""
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    assert use_small_linear(lin, tensor_cores=True) == 1
    assert type(lin[0]) is SmallLinear and lin[0].tensor_cores
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lin(x), small_linear(x, lin[0].weight, lin[0].bias))
    hass_ext.ops.use_blas_linear(lin)
    assert type(lin[0]) is torch.nn.Linear and "tensor_cores" not in lin[0].__dict__


# ---- CUDA ------------------------------------------------------------------------------------------------------

def tc(x, w, b=None):
    with torch.inference_mode():
        return torch.ops.hass.small_linear_tc(x, w, b)


def assert_matches_reference(y, x, w, b=None):
    ref = x.double().cpu() @ w.double().cpu().T
    if b is not None:
        ref = ref + b.double().cpu()
    tol = 1e-2 if x.dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(77, 1024), (40, 72), (300, 4104), (24, 8)])
def test_cuda_tc_rows_do_not_depend_on_m_or_position(dtype, N, K):
    """M = 1 .. 67 (every tile count, partial tiles, two groups past 64 rows), rows alone, shifted, permuted."""
    gen = torch.Generator().manual_seed(K)
    M = 64
    x, w = rand(M, K, dtype=dtype, gen=gen, device="cuda"), rand(N, K, dtype=dtype, gen=gen, scale=0.05, device="cuda")
    b = rand(N, dtype=dtype, gen=gen, device="cuda")
    full = tc(x, w, b)
    assert_matches_reference(full, x, w, b)
    for m in (1, 2, 7, 15, 16, 17, 31, 33, 47, 49, 60, 63):
        assert torch.equal(tc(x[:m], w, b), full[:m]), f"M = {m}"
    for j in (0, 5, 8, 15, 16, 37, 63):
        assert torch.equal(tc(x[j:j + 1], w, b), full[j:j + 1]), f"row {j}"
    for j in (1, 3, 9):
        assert torch.equal(tc(x[j:j + 50], w, b), full[j:j + 50]), f"rows {j}.."
    perm = torch.randperm(M, generator=gen).cuda()
    assert torch.equal(tc(x[perm], w, b), full[perm])
    big = torch.cat([x, x, x[:3]])  # M = 131: three groups of rows
    assert torch.equal(tc(big, w, b), torch.cat([full, full, full[:3]]))


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tc_unaligned_and_strided_operands_give_the_same_bits(dtype):
    gen = torch.Generator().manual_seed(3)
    N, K = 50, 1000
    xbig = rand(9, K + 24, dtype=dtype, gen=gen, device="cuda")
    wbig = rand(2 * N, K + 24, dtype=dtype, gen=gen, scale=0.05, device="cuda")
    want = tc(xbig[:, 8:8 + K].contiguous(), wbig[:N, 8:8 + K].contiguous())
    for xs in (xbig[:, :K], xbig[:, 1:1 + K], xbig[:, 8:8 + K].T.contiguous().T):
        for ws in (wbig[:N, :K], wbig[:N, 3:3 + K], wbig[:N, 8:8 + K]):
            assert torch.equal(tc(xs, ws), tc(xs.contiguous(), ws.contiguous()))
    assert torch.equal(tc(xbig[:, 8:8 + K], wbig[:N, 8:8 + K]), want)
    assert torch.equal(tc(xbig[:, 8:8 + K], wbig[::2, 8:8 + K]), tc(xbig[:, 8:8 + K], wbig[::2, 8:8 + K].contiguous()))


@cuda
def test_cuda_tc_bias_empty_and_llama_shapes():
    gen = torch.Generator().manual_seed(11)
    x = rand(4, 256, dtype=torch.bfloat16, gen=gen, device="cuda")
    w = rand(40, 256, dtype=torch.bfloat16, gen=gen, scale=0.05, device="cuda")
    for bdtype in (torch.float32, torch.bfloat16, torch.float16):
        b = rand(40, dtype=bdtype, gen=gen, device="cuda")
        assert torch.equal(tc(x, w, b), tc(x, w, b.float()))
    assert tc(x[:0], w).shape == (0, 40) and tc(x, w[:0]).shape == (4, 0)
    assert torch.equal(tc(x[:, :0], w[:, :0]), torch.zeros(4, 40, dtype=torch.bfloat16, device="cuda"))
    # Llama-3-8B projections: a tree's 60 rows give each row's one-row bits
    for N, K in ((1024, 4096), (4096, 14336), (14336, 4096)):
        xs = rand(60, K, dtype=torch.bfloat16, gen=gen, device="cuda")
        ws = rand(N, K, dtype=torch.bfloat16, gen=gen, scale=0.02, device="cuda")
        full = tc(xs, ws)
        assert_matches_reference(full[:4], xs[:4], ws)
        assert torch.equal(torch.cat([tc(xs[j:j + 1], ws) for j in range(0, 60, 7)]), full[0:60:7])


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tc_target_is_lossless_in_16_bit(dtype):
    """A tiny 16-bit target with every linear layer on small_linear_tc and hass_tree attention, unscaled logits
    (near-ties everywhere): greedy speculative decoding (eager and fixed-shape rounds) == vanilla, token for token."""
    from test_batch import PROMPTS, exact_tiny

    target = exact_tiny(seed=3, dtype=dtype)
    target.model.to("cuda")
    use_small_linear(target.model, tensor_cores=True)
    draft = hass_ext.init_draft(target, seed=1).to(device="cuda", dtype=dtype)
    tree = dict(total_tokens=16, depth=4, tree_topk=4)
    for prompt in PROMPTS[:4]:
        want = hass_ext.generate(prompt, target=target, max_new_tokens=32, cuda_graphs=False).token_ids
        for graphs in (False, True):
            got = hass_ext.generate(prompt, target=target, draft=draft, max_new_tokens=32, cuda_graphs=graphs,
                                    **tree).token_ids
            assert got == want, f"cuda_graphs={graphs}"
