"""Malformed inputs thrown straight at every registered op (torch.ops.hass.*, bypassing hass_ext.ops).

Each case runs in a forked child process, so a crash (SIGSEGV, abort) or a hang is reported as a failure naming
the case instead of taking the test run down. A bad case must raise the expected exception type with a message
matching the expected pattern (the argument's name); a valid case (including the non-contiguous variants in the
generated matrix) must succeed, so the checks are shown not to reject good input.

Device-mismatch and sparse-layout cases call the CPU kernel directly (OpOverload.redispatch to the CPU key) with
one argument on the meta device or sparse: the dispatcher would otherwise route the call elsewhere, and the
point is that the kernel's own checks catch it.
"""
import math
import multiprocessing
import os
import re
from typing import Callable, List, NamedTuple, Optional

import pytest
import torch

import hass_ext  # noqa: F401  (registers torch.ops.hass)

ops = torch.ops.hass
_FORK = multiprocessing.get_context("fork")
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
torch.testing.assert_close(torch.zeros(2), torch.zeros(2))  # its lazy imports, once here rather than per child


class Case(NamedTuple):
    name: str
    fn: Callable[[], object]
    error: Optional[type]  # None: must succeed
    match: str = ""


CASES: List[Case] = []


def bad(name, match, error=RuntimeError):
    def register(fn):
        CASES.append(Case(name, fn, error, match))
        return fn
    return register


def good(name):
    def register(fn):
        CASES.append(Case(name, fn, None))
        return fn
    return register


def cpu_kernel(op, *args):
    """Call the op's CPU kernel itself, whatever devices/layouts the arguments have."""
    return op.default.redispatch(_CPU_KEYS, *args)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with a non-contiguous last dim (every other element of a wider buffer)."""
    buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype) if t.dim() else None
    if buf is None:
        return t
    buf[..., ::2] = t
    return buf[..., ::2]


def _child(conn, fn):
    torch.set_num_threads(1)  # no OpenMP team in a forked child (the parent may have used one)
    try:
        fn()
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        conn.send(("raised", type(e).__name__, [c.__name__ for c in type(e).__mro__], str(e)[:4000]))
    else:
        conn.send(("ok", None, [], ""))
    conn.close()
    os._exit(0)


def run_isolated(fn, timeout=60.0):
    """Run fn in a forked child: ('ok'|'raised'|'crash'|'hang', exception type name, its MRO names, detail)."""
    recv, send = _FORK.Pipe(duplex=False)
    proc = _FORK.Process(target=_child, args=(send, fn))
    proc.start()
    send.close()
    result = None
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:  # the child died before reporting
            pass
    proc.join(5.0 if result is not None else timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return ("hang", None, [], f"no result within {timeout} s")
    if proc.exitcode != 0 or result is None:
        return ("crash", None, [], f"exit code {proc.exitcode}")
    return result


# ---- shared valid inputs ------------------------------------------------------------------------------------

def tree_args(B=2, Hq=4, Hkv=2, n=3, L=7, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, n, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=g).to(dtype)
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(B, n, n).contiguous()
    return [q, k, v, mask, None, 0.35]


def align_args(F=3, B=2, Hq=4, Hkv=2, T=5, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, T, d, generator=g).to(dtype)
    kl = torch.randn(F, B, Hkv, T, d, generator=g).to(dtype)
    vl = torch.randn(F, B, Hkv, T, d, generator=g).to(dtype)
    return [q, kl, vl, 0.35, False]


def align_backward_args(shapes_only=False, **kw):
    q, kl, vl, scale, _ = align_args(**kw)
    if shapes_only:  # no kernel call (the parent process only builds the case list)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    else:
        out, lse = ops.align_attention(q, kl, vl, scale, False)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype)
    return [grad_out, q, kl, vl, out, lse, scale]


def compact_args(B=2, S=10):
    caches = [torch.randn(B, 2, S, 4), torch.randn(3, B, 2, S, 4)]
    src = torch.tensor([[3, 4, -1], [5, 6, 7]][:B], dtype=torch.int64)
    dst = torch.tensor([2, 3][:B], dtype=torch.int64)
    return [caches, src, dst]


def verify_args(B=2, n=4, V=11, temperature=1.0):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, n, V, generator=g)
    tokens = torch.randint(0, V, (B, n), generator=g)
    parents = torch.tensor([-1, 0, 0, 1]).expand(B, n).contiguous()
    uniforms = torch.rand(B, n, generator=g)
    return [logits, tokens, parents, temperature, 1.0, 0, uniforms, None]


def distill_args(N=6, V=50, topk=5):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(N, V, generator=g), torch.randn(N, V, generator=g), torch.ones(N), topk]


def distill_backward_args(N=6, V=50, topk=5, shapes_only=False):
    z, t, m, k = distill_args(N, V, topk)
    if shapes_only:
        stats, idx = torch.empty(N, 5), torch.empty(N, topk, dtype=torch.int64)
    else:
        _, _, stats, idx = ops.distill_loss(z, t, m, k)
    return [torch.tensor(1.0), torch.tensor(0.5), z, t, m, stats, idx]


def chunk_args(N=4, C=16, K=3):
    g = torch.Generator().manual_seed(4)
    state = torch.tensor([[-math.inf, 0.0]]).repeat(N, 1)
    return [torch.randn(N, C, generator=g), state, torch.full((N, K), -math.inf), torch.full((N, K), -1), 0, True]


def linear_args(M=3, K=8, N=5):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)]


def tc_linear_args(M=3, K=8, N=5, dtype=torch.bfloat16):
    return [t.to(dtype) for t in linear_args(M, K, N)]


def with_(args, i, value):
    args = list(args)
    args[i] = value
    return args


# ---- tree_attention -----------------------------------------------------------------------------------------

@good("tree_attention/valid")
def _():
    q, k, v, mask, _, scale = tree_args()
    out = ops.tree_attention(q, k, v, mask, torch.tensor([4, 2]), scale)
    assert out.shape == q.shape and torch.isfinite(out).all()


@good("tree_attention/valid_bf16_strided_cache")
def _():
    q, k, v, mask, _, scale = tree_args(dtype=torch.bfloat16)
    big_k, big_v = torch.zeros(2, 2, 20, 8, dtype=torch.bfloat16), torch.zeros(2, 2, 20, 8, dtype=torch.bfloat16)
    big_k[:, :, :7], big_v[:, :, :7] = k, v
    out = ops.tree_attention(q, big_k[:, :, :7], big_v[:, :, :7], mask, None, scale)
    torch.testing.assert_close(out, ops.tree_attention(q, k, v, mask, None, scale))


@good("tree_attention/valid_empty_batch")
def _():
    assert ops.tree_attention(*tree_args(B=0)).shape == (0, 4, 3, 8)


@good("tree_attention/valid_no_prefix")
def _():
    ops.tree_attention(*tree_args(n=3, L=3))


bad("tree_attention/k_dtype", "k must have q's dtype")(
    lambda: ops.tree_attention(*with_(tree_args(), 1, tree_args()[1].bfloat16())))
bad("tree_attention/v_dtype", "v must have q's dtype")(
    lambda: ops.tree_attention(*with_(tree_args(), 2, tree_args()[2].half())))
bad("tree_attention/v_shorter_than_k", "v must have k's shape")(
    lambda: ops.tree_attention(*with_(tree_args(), 2, tree_args()[2][:, :, :5])))
bad("tree_attention/v_much_shorter_than_k", "v must have k's shape")(
    lambda: ops.tree_attention(*with_(tree_args(L=4000), 2, tree_args(L=4)[2])))
bad("tree_attention/batch_mismatch", r"k.shape\[0\] must be q's batch")(
    lambda: ops.tree_attention(*(tree_args(B=64)[:1] + tree_args(B=1)[1:3] + tree_args(B=64)[3:])))
bad("tree_attention/head_dim_mismatch", r"k.shape\[3\] must be q's head_dim")(
    lambda: ops.tree_attention(*(tree_args(d=8)[:1] + tree_args(d=4)[1:3] + tree_args()[3:])))
bad("tree_attention/v_head_dim_mismatch", "v must have k's shape")(
    lambda: ops.tree_attention(*with_(tree_args(), 2, tree_args(d=16)[2])))
bad("tree_attention/mask_dtype", "tree_mask must have dtype")(
    lambda: ops.tree_attention(*with_(tree_args(), 3, tree_args()[3].to(torch.uint8))))
bad("tree_attention/mask_undersized", r"tree_mask must be \[B, n, n\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 3, tree_args()[3][:, :2, :2])))
bad("tree_attention/mask_2d", r"tree_mask must be \[B, n, n\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 3, tree_args()[3][0])))
bad("tree_attention/mask_batch", r"tree_mask must be \[B, n, n\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 3, tree_args()[3][:1])))
bad("tree_attention/n_vs_mask", r"tree_mask must be \[B, n, n\]")(
    lambda: ops.tree_attention(*(tree_args(n=4)[:3] + tree_args(n=3)[3:])))
bad("tree_attention/L_below_n", "L = k.shape.2. = 2 < n")(
    lambda: ops.tree_attention(*(tree_args(n=3)[:1] + tree_args(L=2)[1:3] + tree_args(n=3)[3:])))
bad("tree_attention/prefix_lens_shape", r"prefix_lens must be \[B\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([1, 2, 3]))))
bad("tree_attention/prefix_lens_dtype", "prefix_lens must have dtype")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([1, 2], dtype=torch.int32))))
bad("tree_attention/prefix_lens_2d", r"prefix_lens must be \[B\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([[1, 2]]))))
bad("tree_attention/prefix_lens_negative", r"prefix_lens\[0\] = -1 is outside \[0, L - n\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([-1, 2]))))
bad("tree_attention/prefix_lens_too_long", r"prefix_lens\[1\] = 5 is outside \[0, L - n\] = \[0, 4\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([4, 5]))))
bad("tree_attention/prefix_lens_huge", r"prefix_lens\[0\] = 1000000000 is outside")(
    lambda: ops.tree_attention(*with_(tree_args(), 4, torch.tensor([10**9, 0]))))
bad("tree_attention/heads_not_multiple", "must be a multiple of the key/value heads")(
    lambda: ops.tree_attention(*(tree_args(Hq=3)[:1] + tree_args()[1:])))
bad("tree_attention/zero_kv_heads", "must be a multiple of the key/value heads")(
    lambda: ops.tree_attention(*(tree_args()[:1] + tree_args(Hkv=0)[1:3] + tree_args()[3:])))
bad("tree_attention/q_int", "q must have dtype")(
    lambda: ops.tree_attention(*with_(tree_args(), 0, tree_args()[0].int())))
bad("tree_attention/q_float64", "q must have dtype")(
    lambda: ops.tree_attention(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                 for a in tree_args()]))
bad("tree_attention/q_3d", r"q must be \[B, Hq, n, d\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 0, tree_args()[0][0])))
bad("tree_attention/k_5d", r"k must be \[B, Hkv, L, d\]")(
    lambda: ops.tree_attention(*with_(tree_args(), 1, tree_args()[1][None])))
bad("tree_attention/too_many_nodes", "at most 1024 tree nodes")(
    lambda: ops.tree_attention(*tree_args(B=1, Hq=1, Hkv=1, n=1025, L=1025, d=1)))
bad("tree_attention/scale_nan", "scale must be a finite number")(
    lambda: ops.tree_attention(*with_(tree_args(), 5, float("nan"))))
bad("tree_attention/scale_inf", "scale must be a finite number")(
    lambda: ops.tree_attention(*with_(tree_args(), 5, float("inf"))))
bad("tree_attention/k_on_other_device", "k must be on q's device")(
    lambda: cpu_kernel(ops.tree_attention, *with_(tree_args(), 1, tree_args()[1].to("meta"))))
bad("tree_attention/mask_on_other_device", "tree_mask must be on q's device")(
    lambda: cpu_kernel(ops.tree_attention, *with_(tree_args(), 3, tree_args()[3].to("meta"))))
bad("tree_attention/prefix_lens_on_other_device", "prefix_lens must be on q's device")(
    lambda: cpu_kernel(ops.tree_attention, *with_(tree_args(), 4, torch.zeros(2, dtype=torch.int64,
                                                                                 device="meta"))))


# ---- align_attention (+ backward) ---------------------------------------------------------------------------

@good("align_attention/valid")
def _():
    out, lse = ops.align_attention(*align_args())
    assert out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5) and torch.isfinite(out).all()


@good("align_attention/valid_one_level_fp16")
def _():
    ops.align_attention(*align_args(F=1, dtype=torch.float16))


@good("align_attention_backward/valid")
def _():
    dq, dk, dv = ops.align_attention_backward(*align_backward_args())
    assert dq.shape == (2, 4, 5, 8) and dk.shape == dv.shape == (3, 2, 2, 5, 8)


bad("align_attention/T_mismatch", r"k_levels.shape\[3\] must be q's length T")(
    lambda: ops.align_attention(*(align_args(T=5)[:1] + align_args(T=4)[1:])))
bad("align_attention/T_mismatch_large", r"k_levels.shape\[3\] must be q's length T = 4096")(
    lambda: ops.align_attention(*(align_args(T=4096, B=1, Hq=2, Hkv=1)[:1] + align_args(T=8, B=1, Hq=2, Hkv=1)[1:])))
bad("align_attention/no_levels", "at least one level")(
    lambda: ops.align_attention(*with_(with_(align_args(), 1, align_args()[1][:0]), 2, align_args()[2][:0])))
bad("align_attention/batch_mismatch", r"k_levels.shape\[1\] must be q's batch")(
    lambda: ops.align_attention(*(align_args(B=2)[:1] + align_args(B=1)[1:])))
bad("align_attention/heads_not_multiple", "must be a multiple of the key/value heads")(
    lambda: ops.align_attention(*(align_args(Hq=3)[:1] + align_args()[1:])))
bad("align_attention/head_dim_mismatch", r"k_levels.shape\[4\] must be q's head_dim")(
    lambda: ops.align_attention(*(align_args(d=8)[:1] + align_args(d=16)[1:])))
bad("align_attention/k_dtype", "k_levels must have q's dtype")(
    lambda: ops.align_attention(*with_(align_args(), 1, align_args()[1].bfloat16())))
bad("align_attention/v_levels_shape", "v_levels must have k_levels' shape")(
    lambda: ops.align_attention(*with_(align_args(), 2, align_args(F=2)[2])))
bad("align_attention/k_levels_4d", r"k_levels must be \[F, B, Hkv, T, d\]")(
    lambda: ops.align_attention(*with_(align_args(), 1, align_args()[1][0])))
bad("align_attention/q_float64", "q must have dtype")(
    lambda: ops.align_attention(*align_args(dtype=torch.float64)))
bad("align_attention/scale_inf", "scale must be a finite number")(
    lambda: ops.align_attention(*with_(align_args(), 3, float("inf"))))
bad("align_attention/v_on_other_device", "v_levels must be on q's device")(
    lambda: cpu_kernel(ops.align_attention, *with_(align_args(), 2, align_args()[2].to("meta"))))
bad("align_attention_backward/grad_out_shape", r"grad_out must be q's shape")(
    lambda: ops.align_attention_backward(*with_(align_backward_args(), 0, align_backward_args()[0][:, :, :4])))
bad("align_attention_backward/out_dtype", "out must have q's dtype")(
    lambda: ops.align_attention_backward(*with_(align_backward_args(), 4, align_backward_args()[4].half())))
bad("align_attention_backward/lse_dtype", "lse must have dtype")(
    lambda: ops.align_attention_backward(*with_(align_backward_args(), 5, align_backward_args()[5].half())))
bad("align_attention_backward/lse_shape", r"lse must be \[B, Hq, T\]")(
    lambda: ops.align_attention_backward(*with_(align_backward_args(), 5, align_backward_args()[5][:, :, :4])))
bad("align_attention_backward/lse_2d", r"lse must be \[B, Hq, T\]")(
    lambda: ops.align_attention_backward(*with_(align_backward_args(), 5, align_backward_args()[5][0])))
bad("align_attention_backward/T_mismatch_large", r"k_levels.shape\[3\] must be q's length T = 4096")(
    lambda: ops.align_attention_backward(*(
        align_backward_args(T=4096, B=1, Hq=2, Hkv=1)[:2] + align_args(T=8, B=1, Hq=2, Hkv=1)[1:3]
        + align_backward_args(T=4096, B=1, Hq=2, Hkv=1)[4:])))
bad("align_attention_backward/levels_batch", r"k_levels.shape\[1\] must be q's batch")(
    lambda: ops.align_attention_backward(*(align_backward_args()[:2] + align_args(B=1)[1:3]
                                           + align_backward_args()[4:])))
bad("align_attention_backward/grad_out_on_other_device", "grad_out must be on q's device")(
    lambda: cpu_kernel(ops.align_attention_backward,
                       *with_(align_backward_args(), 0, align_backward_args()[0].to("meta"))))


# ---- compact_kv ---------------------------------------------------------------------------------------------

@good("compact_kv/valid")
def _():
    caches, src, dst = compact_args()
    before = [c.clone() for c in caches]
    ops.compact_kv(caches, src, dst)
    for c, b in zip(caches, before):
        cb = c.dim() - 4
        for row, (slots, d0) in enumerate(zip(src.tolist(), dst.tolist())):
            valid = [s for s in slots if s >= 0]
            got = c.select(cb, row)[..., d0:d0 + len(valid), :]
            assert torch.equal(got, b.select(cb, row)[..., valid, :])


@good("compact_kv/valid_fp16_empty_plan")
def _():
    ops.compact_kv([torch.randn(2, 1, 4, 2).half()], torch.empty(2, 0, dtype=torch.int64),
                   torch.zeros(2, dtype=torch.int64))


def _unchanged_after(caches, src, dst):
    """Call compact_kv; when it raises, require every cache to be untouched, then re-raise."""
    before = [c.clone() for c in caches]
    try:
        ops.compact_kv(caches, src, dst)
    except RuntimeError:
        for i, (c, b) in enumerate(zip(caches, before)):
            assert torch.equal(c, b), f"caches[{i}] was changed by a call that failed"
        raise


bad("compact_kv/dst_start_shorter_than_batch", r"dst_start must be \[B\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 2, torch.tensor([2]))))
bad("compact_kv/dst_start_0dim", r"dst_start must be int64 \[B\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 2, torch.tensor(2))))
bad("compact_kv/src_slots_3d", r"src_slots must be int64 \[B, m\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 1, compact_args()[1][None])))
bad("compact_kv/src_slots_1d", r"src_slots must be int64 \[B, m\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 1, compact_args()[1][0])))
bad("compact_kv/src_slots_int32", "src_slots must have dtype")(
    lambda: ops.compact_kv(*with_(compact_args(), 1, compact_args()[1].int())))
bad("compact_kv/dst_start_int32", "dst_start must have dtype")(
    lambda: ops.compact_kv(*with_(compact_args(), 2, compact_args()[2].int())))
bad("compact_kv/cache_batch", r"caches\[0\] has batch 3 but src_slots has 2 rows")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [torch.randn(3, 2, 10, 4)])))
bad("compact_kv/second_cache_batch", r"caches\[1\] has batch 1")(
    lambda: _unchanged_after(*with_(compact_args(), 0, [torch.randn(2, 2, 10, 4), torch.randn(1, 2, 10, 4)])))
bad("compact_kv/cache_int", r"caches\[0\] must be a floating-point tensor")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [torch.zeros(2, 2, 10, 4, dtype=torch.int32)])))
bad("compact_kv/cache_3d", r"caches\[0\] must be \[B, H, S, D\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [torch.randn(2, 10, 4)])))
bad("compact_kv/cache_last_dim_strided", r"caches\[0\] must be contiguous in its last dim")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [strided(torch.randn(2, 2, 10, 4))])))
bad("compact_kv/no_caches", "caches is empty")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [])))
bad("compact_kv/src_slot_past_end", r"batch row 1 address slots outside \[0, 10\)")(
    lambda: _unchanged_after(*with_(compact_args(), 1, torch.tensor([[3, 4, -1], [5, 6, 10]]))))
bad("compact_kv/src_slot_below_minus_one", r"src_slots\[0, 2\] = -2")(
    lambda: _unchanged_after(*with_(compact_args(), 1, torch.tensor([[3, 4, -2], [5, 6, 7]]))))
bad("compact_kv/slot_after_padding", "address slots outside")(
    lambda: _unchanged_after(*with_(compact_args(), 1, torch.tensor([[3, -1, 4], [5, 6, 7]]))))
bad("compact_kv/dst_past_end", r"batch row 1 address slots outside \[0, 10\)")(
    lambda: _unchanged_after(*with_(compact_args(), 2, torch.tensor([2, 8]))))
bad("compact_kv/dst_negative", r"batch row 0 address slots outside")(
    lambda: _unchanged_after(*with_(compact_args(), 2, torch.tensor([-1, 0]))))
bad("compact_kv/smaller_second_cache", r"address slots outside \[0, 6\)")(
    lambda: _unchanged_after(*with_(compact_args(), 0, [torch.randn(2, 2, 10, 4), torch.randn(2, 2, 6, 4)])))
bad("compact_kv/same_cache_twice", r"caches\[1\] shares memory with caches\[0\]")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [compact_args()[0][0]] * 2)))
bad("compact_kv/overlapping_cache_views", r"caches\[1\] shares memory with caches\[0\]")(
    lambda: (lambda c: ops.compact_kv(*with_(compact_args(), 0, [c[:2], c[1:]])))(torch.randn(3, 2, 2, 10, 4)))


@good("compact_kv/valid_interleaved_views_of_one_buffer")
def _():
    kv = torch.randn(3, 2, 2, 2, 10, 4)  # [layers, K/V, B, H, S, D]: K and V of every layer, strided views
    caches, src, dst = compact_args()
    ops.compact_kv([kv[:, 0], kv[:, 1]], src, dst)


bad("compact_kv/expanded_cache", r"caches\[0\] has elements sharing memory")(
    lambda: ops.compact_kv(*with_(compact_args(), 0, [torch.randn(1, 2, 10, 4).expand(2, 2, 10, 4)])))
bad("compact_kv/dst_on_other_device", "dst_start must be on src_slots's device")(
    lambda: cpu_kernel(ops.compact_kv, *with_(compact_args(), 2, compact_args()[2].to("meta"))))
bad("compact_kv/cache_on_other_device", r"caches\[1\] must be on src_slots's device")(
    lambda: cpu_kernel(ops.compact_kv, *with_(compact_args(), 0,
                                              [torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4, device="meta")])))


# ---- verify_tree (ValueError, as documented by hass_ext.ops.verify_tree) ------------------------------------

@good("verify_tree/valid_sampling")
def _():
    acc, n_acc, nxt = ops.verify_tree(*verify_args())
    assert acc.shape == (2, 4) and (acc[:, 0] == 0).all() and ((0 <= nxt) & (nxt < 11)).all()


@good("verify_tree/valid_greedy_generator_empty_batch")
def _():
    ops.verify_tree(*with_(verify_args(temperature=0.0), 6, None))
    ops.verify_tree(*with_(with_(verify_args(), 6, None), 7, torch.Generator().manual_seed(0)))
    ops.verify_tree(*verify_args(B=0))


def _vbad(name, match):
    return bad("verify_tree/" + name, match, ValueError)


_vbad("logits_2d", r"target_logits must be \[B, n, V\]")(
    lambda: ops.verify_tree(*with_(verify_args(), 0, verify_args()[0][0])))
_vbad("logits_int", "target_logits must have dtype")(
    lambda: ops.verify_tree(*with_(verify_args(), 0, verify_args()[0].int())))
_vbad("logits_float64", "target_logits must have dtype")(
    lambda: ops.verify_tree(*with_(verify_args(), 0, verify_args()[0].double())))
_vbad("no_nodes", "needs n >= 1 nodes")(
    lambda: ops.verify_tree(*[a[:, :0] if isinstance(a, torch.Tensor) else a for a in verify_args()]))
_vbad("empty_vocabulary", "V >= 1")(
    lambda: ops.verify_tree(*with_(verify_args(), 0, verify_args()[0][..., :0])))
_vbad("tokens_shape", r"draft_tokens must be \[B, n\]")(
    lambda: ops.verify_tree(*with_(verify_args(), 1, verify_args()[1][:, :3])))
_vbad("tokens_batch", r"draft_tokens must be \[B, n\]")(
    lambda: ops.verify_tree(*with_(verify_args(B=64), 1, verify_args(B=1)[1])))
_vbad("parents_int32", "parents must have dtype")(
    lambda: ops.verify_tree(*with_(verify_args(), 2, verify_args()[2].int())))
_vbad("parents_1d", r"parents must be int64 \[B, n\]")(
    lambda: ops.verify_tree(*with_(verify_args(), 2, verify_args()[2][0])))
_vbad("token_too_large", r"draft_tokens\[1\] holds a token id outside \[0, 11\)")(
    lambda: ops.verify_tree(*with_(verify_args(), 1, torch.tensor([[0, 1, 2, 3], [0, 1, 11, 3]]))))
_vbad("token_negative", r"holds a token id outside \[0, 11\)")(
    lambda: ops.verify_tree(*with_(verify_args(), 1, torch.tensor([[0, 1, -4, 3], [0, 1, 2, 3]]))))
_vbad("token_huge", r"holds a token id outside")(
    lambda: ops.verify_tree(*with_(verify_args(temperature=0.0), 1, torch.tensor([[0, 2**40, 1, 1]] * 2))))
_vbad("root_has_parent", "is not a tree in node order")(
    lambda: ops.verify_tree(*with_(verify_args(), 2, torch.tensor([[0, 0, 0, 1], [-1, 0, 0, 1]]))))
_vbad("parent_not_before_child", "is not a tree in node order")(
    lambda: ops.verify_tree(*with_(verify_args(), 2, torch.tensor([[-1, 0, 0, 3], [-1, 0, 0, 1]]))))
_vbad("parent_below_minus_one", "is not a tree in node order")(
    lambda: ops.verify_tree(*with_(verify_args(), 2, torch.tensor([[-1, -5, 0, 1], [-1, 0, 0, 1]]))))
_vbad("temperature_negative", "temperature must be a finite number >= 0")(
    lambda: ops.verify_tree(*with_(verify_args(), 3, -1.0)))
_vbad("temperature_nan", "temperature must be a finite number >= 0")(
    lambda: ops.verify_tree(*with_(verify_args(), 3, float("nan"))))
_vbad("temperature_inf", "temperature must be a finite number >= 0")(
    lambda: ops.verify_tree(*with_(verify_args(), 3, float("inf"))))
_vbad("top_p_zero", r"top_p must be in \(0, 1\]")(lambda: ops.verify_tree(*with_(verify_args(), 4, 0.0)))
_vbad("top_p_above_one", r"top_p must be in \(0, 1\]")(lambda: ops.verify_tree(*with_(verify_args(), 4, 1.5)))
_vbad("top_p_nan", r"top_p must be in \(0, 1\]")(lambda: ops.verify_tree(*with_(verify_args(), 4, float("nan"))))
_vbad("top_k_negative", "top_k must be >= 0")(lambda: ops.verify_tree(*with_(verify_args(), 5, -1)))
_vbad("uniforms_shape", r"uniforms must be \[B, n\]")(
    lambda: ops.verify_tree(*with_(verify_args(), 6, torch.rand(2, 3))))
_vbad("uniforms_float64", "uniforms must have dtype")(
    lambda: ops.verify_tree(*with_(verify_args(), 6, torch.rand(2, 4, dtype=torch.float64))))
_vbad("uniform_one", r"uniforms must lie in \[0, 1\)")(
    lambda: ops.verify_tree(*with_(verify_args(), 6, torch.ones(2, 4))))
_vbad("uniform_negative", r"uniforms must lie in \[0, 1\)")(
    lambda: ops.verify_tree(*with_(verify_args(), 6, torch.full((2, 4), -0.1))))
_vbad("uniform_nan", r"uniforms must lie in \[0, 1\)")(
    lambda: ops.verify_tree(*with_(verify_args(), 6, torch.full((2, 4), float("nan")))))
_vbad("tokens_on_other_device", "draft_tokens must be on target_logits's device")(
    lambda: cpu_kernel(ops.verify_tree, *with_(verify_args(), 1, verify_args()[1].to("meta"))))
_vbad("uniforms_on_other_device", "uniforms must be on target_logits's device")(
    lambda: cpu_kernel(ops.verify_tree, *with_(verify_args(), 6, verify_args()[6].to("meta"))))


# ---- distill_loss (+ backward) ------------------------------------------------------------------------------

@good("distill_loss/valid_mixed_dtypes_and_empty")
def _():
    z, t, m, k = distill_args()
    ce, tk, stats, idx = ops.distill_loss(z.bfloat16(), t, m, k)
    assert torch.isfinite(ce) and stats.shape == (6, 5) and idx.shape == (6, 5)
    ops.distill_loss(*distill_args(N=0))


@good("distill_loss_backward/valid")
def _():
    assert ops.distill_loss_backward(*distill_backward_args()).shape == (6, 50)


@good("distill_loss_backward/valid_out_of_range_topk_entries_skipped")
def _():
    args = distill_backward_args()
    ref = ops.distill_loss_backward(*args)
    idx = args[6].clone()
    idx[0, 0], idx[1, 1] = 10**9, -7  # such entries are not dereferenced
    ops.distill_loss_backward(*with_(args, 6, idx))
    assert ref.shape == (6, 50)


bad("distill_loss/draft_3d", r"draft_logits must be \[N, V\]")(
    lambda: ops.distill_loss(*with_(distill_args(), 0, distill_args()[0][None])))
bad("distill_loss/target_shape", "target_logits must be draft_logits' shape")(
    lambda: ops.distill_loss(*with_(distill_args(), 1, distill_args()[1][:, :40])))
bad("distill_loss/target_fewer_rows", "target_logits must be draft_logits' shape")(
    lambda: ops.distill_loss(*with_(distill_args(N=500), 1, distill_args(N=2)[1])))
bad("distill_loss/draft_int", "draft_logits must have dtype")(
    lambda: ops.distill_loss(*with_(distill_args(), 0, distill_args()[0].int())))
bad("distill_loss/target_float64", "target_logits must have dtype")(
    lambda: ops.distill_loss(*with_(distill_args(), 1, distill_args()[1].double())))
bad("distill_loss/mask_bool", "loss_mask must have dtype")(
    lambda: ops.distill_loss(*with_(distill_args(), 2, distill_args()[2].bool())))
bad("distill_loss/mask_short", r"loss_mask must be \[N\]")(
    lambda: ops.distill_loss(*with_(distill_args(), 2, distill_args()[2][:5])))
bad("distill_loss/mask_2d", r"loss_mask must be float32 \[N\]")(
    lambda: ops.distill_loss(*with_(distill_args(), 2, distill_args()[2][:, None])))
bad("distill_loss/topk_zero", r"topk must be in \[1, min\(64")(lambda: ops.distill_loss(*with_(distill_args(), 3, 0)))
bad("distill_loss/topk_65", r"topk must be in \[1, min\(64")(
    lambda: ops.distill_loss(*with_(distill_args(V=100), 3, 65)))
bad("distill_loss/topk_above_vocab", r"topk must be in \[1, min\(64, V = 50\)\]")(
    lambda: ops.distill_loss(*with_(distill_args(), 3, 51)))
bad("distill_loss/empty_vocabulary", "empty vocabulary")(lambda: ops.distill_loss(*distill_args(V=0, topk=1)))
bad("distill_loss/mask_on_other_device", "loss_mask must be on draft_logits's device")(
    lambda: cpu_kernel(ops.distill_loss, *with_(distill_args(), 2, distill_args()[2].to("meta"))))
bad("distill_loss_backward/row_stats_shape", r"row_stats must be \[N, 5\]")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 5, distill_backward_args()[5][:, :4])))
bad("distill_loss_backward/row_stats_dtype", "row_stats must have dtype")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 5, distill_backward_args()[5].half())))
bad("distill_loss_backward/topk_idx_int32", "topk_idx must have dtype")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 6, distill_backward_args()[6].int())))
bad("distill_loss_backward/topk_idx_rows", r"topk_idx.shape\[0\] must be draft_logits' rows N")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 6, distill_backward_args()[6][:5])))
bad("distill_loss_backward/topk_idx_no_columns", r"topk_idx must have K in \[1")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 6, distill_backward_args()[6][:, :0])))
bad("distill_loss_backward/topk_idx_65_columns", r"topk_idx must have K in \[1")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(V=100), 6, torch.zeros(6, 65, dtype=torch.int64))))
bad("distill_loss_backward/grad_ce_two_elements", "grad_ce must be a one-element float tensor")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 0, torch.ones(2))))
bad("distill_loss_backward/grad_topk_int", "grad_topk must be a one-element float tensor")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 1, torch.tensor(1))))
bad("distill_loss_backward/target_shape", "target_logits must be draft_logits' shape")(
    lambda: ops.distill_loss_backward(*with_(distill_backward_args(), 3, distill_backward_args()[3][:3])))
bad("distill_loss_backward/grad_ce_on_other_device", "grad_ce must be on draft_logits's device")(
    lambda: cpu_kernel(ops.distill_loss_backward,
                       *with_(distill_backward_args(), 0, torch.tensor(1.0, device="meta"))))


# ---- online_softmax_chunk -----------------------------------------------------------------------------------

@good("online_softmax_chunk/valid")
def _():
    e, alpha, state, val, idx = ops.online_softmax_chunk(*chunk_args())
    assert e.shape == (4, 16) and state.shape == (4, 2) and (idx >= 0).all() and (idx < 16).all()


@good("online_softmax_chunk/valid_no_topk_no_exp_empty")
def _():
    ops.online_softmax_chunk(*with_(chunk_args(K=0), 5, False))
    ops.online_softmax_chunk(*chunk_args(N=0))
    ops.online_softmax_chunk(*with_(chunk_args(), 4, 2**31 - 100))


bad("online_softmax_chunk/logits_1d", r"logits must be \[N, C\]")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 0, chunk_args()[0][0])))
bad("online_softmax_chunk/logits_int", "logits must have dtype")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 0, chunk_args()[0].int())))
bad("online_softmax_chunk/state_shape", r"state must be \[N, 2\]")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 1, torch.zeros(4, 3))))
bad("online_softmax_chunk/state_rows", r"state must be \[N, 2\]")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(N=300), 1, chunk_args(N=1)[1])))
bad("online_softmax_chunk/state_float64", "state must have dtype")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 1, chunk_args()[1].double())))
bad("online_softmax_chunk/topk_65", "topk_val must have K <= 64")(
    lambda: ops.online_softmax_chunk(*(chunk_args(K=65)[:4] + chunk_args()[4:])))
bad("online_softmax_chunk/topk_val_rows", r"topk_val.shape\[0\] must be logits' rows N")(
    lambda: ops.online_softmax_chunk(*with_(with_(chunk_args(), 2, chunk_args(N=3)[2]), 3, chunk_args(N=3)[3])))
bad("online_softmax_chunk/topk_idx_shape", "topk_idx must be topk_val's shape")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 3, chunk_args(K=2)[3])))
bad("online_softmax_chunk/topk_idx_int32", "topk_idx must have dtype")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 3, chunk_args()[3].int())))
bad("online_softmax_chunk/col0_negative", "col0 must be >= 0")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 4, -1)))
bad("online_softmax_chunk/col0_overflow", "col0 must be >= 0 with col0 . C < 2.31 - 1")(
    lambda: ops.online_softmax_chunk(*with_(chunk_args(), 4, 2**31)))
bad("online_softmax_chunk/state_on_other_device", "state must be on logits's device")(
    lambda: cpu_kernel(ops.online_softmax_chunk, *with_(chunk_args(), 1, chunk_args()[1].to("meta"))))


# ---- small_linear -------------------------------------------------------------------------------------------

@good("small_linear/valid")
def _():
    x, w, b = linear_args()
    torch.testing.assert_close(ops.small_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(ops.small_linear(x[None], w.bfloat16(), None),
                               torch.nn.functional.linear(x[None], w.bfloat16().float()))


@good("small_linear/valid_16bit")
def _():
    x, w, b = linear_args()
    y = ops.small_linear(x.bfloat16(), w.half(), b.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.bfloat16().float(), w.half().float(),
                                                                     b.bfloat16().float()), atol=0.05, rtol=0.02)


@good("small_linear/valid_empty")
def _():
    x, w, b = linear_args(K=0)
    torch.testing.assert_close(ops.small_linear(x, w, b), b.expand(3, 5))
    assert ops.small_linear(*linear_args(M=0)).shape == (0, 5)


bad("small_linear/x_0dim", r"x must be \[..., K\]")(
    lambda: ops.small_linear(*with_(linear_args(), 0, torch.tensor(1.0))))
bad("small_linear/x_float64", "x must have dtype")(
    lambda: ops.small_linear(*with_(linear_args(), 0, linear_args()[0].double())))
bad("small_linear/x_int32", "x must have dtype")(
    lambda: ops.small_linear(*with_(linear_args(), 0, linear_args()[0].int())))
bad("small_linear/weight_1d", r"weight must be \[N, K\]")(
    lambda: ops.small_linear(*with_(linear_args(), 1, linear_args()[1][0])))
bad("small_linear/weight_float64", "weight must have dtype")(
    lambda: ops.small_linear(*with_(linear_args(), 1, linear_args()[1].double())))
bad("small_linear/K_mismatch", r"x must be \[..., K\] with K = weight.shape\[1\] = 8")(
    lambda: ops.small_linear(*with_(linear_args(), 0, torch.randn(3, 7))))
bad("small_linear/bias_short", r"bias must be \[N\]")(
    lambda: ops.small_linear(*with_(linear_args(), 2, torch.randn(4))))
bad("small_linear/bias_float64", "bias must have dtype")(
    lambda: ops.small_linear(*with_(linear_args(), 2, linear_args()[2].double())))
bad("small_linear/bias_2d", r"bias must be \[N\]")(
    lambda: ops.small_linear(*with_(linear_args(), 2, linear_args()[2][None])))
bad("small_linear/weight_requires_grad", "small_linear has no backward")(
    lambda: ops.small_linear(*with_(linear_args(), 1, linear_args()[1].requires_grad_())))


@good("small_linear/valid_parameters_under_no_grad")
def _():
    x, w, b = linear_args()
    with torch.no_grad():
        ops.small_linear(x, torch.nn.Parameter(w), torch.nn.Parameter(b))


bad("small_linear/weight_on_other_device", "weight must be on x's device")(
    lambda: cpu_kernel(ops.small_linear, *with_(linear_args(), 1, linear_args()[1].to("meta"))))
bad("small_linear/x_on_other_device", "x must be on the CPU")(
    lambda: cpu_kernel(ops.small_linear, *[t.to("meta") for t in linear_args()]))


@good("small_linear_tc/valid")
def _():
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b = tc_linear_args(dtype=dtype)
        assert torch.equal(ops.small_linear_tc(x, w, b), ops.small_linear(x, w, b))  # on the CPU: small_linear
        assert torch.equal(ops.small_linear_tc(x, w, None), ops.small_linear(x, w, None))


bad("small_linear_tc/x_float32", "small_linear_tc: x must have dtype")(
    lambda: ops.small_linear_tc(*with_(tc_linear_args(), 0, linear_args()[0])))
bad("small_linear_tc/mixed_dtypes", "small_linear_tc: weight must have x's dtype")(
    lambda: ops.small_linear_tc(*with_(tc_linear_args(), 1, linear_args()[1].half())))
bad("small_linear_tc/k_not_multiple_of_8", "K = weight.shape.1. must be a multiple of 8")(
    lambda: ops.small_linear_tc(*tc_linear_args(K=12)))
bad("small_linear_tc/k_mismatch", r"x must be \[..., K\]")(
    lambda: ops.small_linear_tc(*with_(tc_linear_args(), 0, tc_linear_args(K=16)[0])))


# ---- generated matrix: every tensor argument of every op, mutated one at a time ------------------------------

BASE = {  # op name -> (op, valid arguments factory)
    "tree_attention": (ops.tree_attention, lambda: with_(tree_args(), 4, torch.tensor([4, 2]))),
    "align_attention": (ops.align_attention, align_args),
    "align_attention_backward": (ops.align_attention_backward, align_backward_args),
    "compact_kv": (ops.compact_kv, compact_args),
    "verify_tree": (ops.verify_tree, verify_args),
    "distill_loss": (ops.distill_loss, distill_args),
    "distill_loss_backward": (ops.distill_loss_backward, distill_backward_args),
    "online_softmax_chunk": (ops.online_softmax_chunk, chunk_args),
    "small_linear": (ops.small_linear, linear_args),
    "small_linear_tc": (ops.small_linear_tc, tc_linear_args),
}
ARG_NAMES = {
    "tree_attention": ["q", "k", "v", "tree_mask", "prefix_lens"],
    "align_attention": ["q", "k_levels", "v_levels"],
    "align_attention_backward": ["grad_out", "q", "k_levels", "v_levels", "out", "lse"],
    "compact_kv": ["caches", "src_slots", "dst_start"],
    "verify_tree": ["target_logits", "draft_tokens", "parents", None, None, None, "uniforms"],
    "distill_loss": ["draft_logits", "target_logits", "loss_mask"],
    "distill_loss_backward": ["grad_ce", "grad_topk", "draft_logits", "target_logits", "loss_mask", "row_stats",
                              "topk_idx"],
    "online_softmax_chunk": ["logits", "state", "topk_val", "topk_idx"],
    "small_linear": ["x", "weight", "bias"],
    "small_linear_tc": ["x", "weight", "bias"],
}
# Mutations that leave a call valid: x of small_linear is [..., K] with any leading dims (none, several, empty);
# a cache may carry a leading dim of stacked layers and any float dtype; a one-element [1] gradient scale.
VALID_MUTATIONS = {("small_linear", "x", "empty"), ("small_linear", "x", "extra_dim"),
                   ("small_linear", "x", "missing_dim"), ("small_linear_tc", "x", "empty"),
                   ("small_linear_tc", "x", "extra_dim"), ("small_linear_tc", "x", "missing_dim"),
                   ("compact_kv", "caches", "extra_dim"),
                   ("compact_kv", "caches", "wrong_dtype"), ("distill_loss_backward", "grad_ce", "extra_dim"),
                   ("distill_loss_backward", "grad_topk", "extra_dim")}
# Arguments whose last dim must be contiguous (the op writes them in place).
NEEDS_CONTIGUOUS = {("compact_kv", "caches")}


def _wrong_dtype(t):
    if t.dtype == torch.bool:
        return t.float()
    if t.dtype == torch.int64:
        return t.int()
    return t.to(torch.int32) if t.dim() == 0 else t.double()


MUTATIONS = {
    "extra_dim": lambda t: t.unsqueeze(0),
    "missing_dim": lambda t: t.reshape(-1)[0] if t.dim() == 1 else t.select(0, 0),
    "wrong_dtype": _wrong_dtype,
    "empty": lambda t: t.narrow(0, 0, 0) if t.dim() else t.new_empty(0),
    "sparse": lambda t: t.to_sparse(),
    "meta": lambda t: t.to("meta"),
    "noncontiguous": strided,
}
REDISPATCHED = {"sparse", "meta"}  # call the CPU kernel itself (the dispatcher would route elsewhere)


def _matrix_case(op_name, arg_index, arg_name, mutation):
    op, make = BASE[op_name]

    def run():
        args = make()
        value = args[arg_index]
        mutate = MUTATIONS[mutation]
        if isinstance(value, list):  # compact_kv caches: mutate the first cache
            args[arg_index] = [mutate(value[0])] + value[1:]
        else:
            args[arg_index] = mutate(value)
        if mutation == "noncontiguous":
            expected = op(*make())
            got = op(*args)
            if got is not None:  # same values, different strides: same result
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            return
        (cpu_kernel(op, *args) if mutation in REDISPATCHED else op(*args))

    error = None if (op_name, arg_name, mutation) in VALID_MUTATIONS else (
        ValueError if op_name == "verify_tree" else RuntimeError)
    match = re.escape(arg_name.split("[")[0])
    if mutation == "noncontiguous":
        if (op_name, arg_name) in NEEDS_CONTIGUOUS:
            match = "contiguous in its last dim"
        else:
            error = None
    elif mutation == "sparse":
        match = rf"{match}.* must be a dense \(strided\) tensor"
    elif mutation == "empty":  # the error may name the argument that no longer agrees with it
        match = "must|has batch"
    return Case(f"matrix/{op_name}/{arg_name}/{mutation}", run, error, match)


def _matrix():
    cases = []
    for op_name, names in ARG_NAMES.items():
        make = BASE[op_name][1]
        args = make(shapes_only=True) if op_name.endswith("_backward") else make()
        for i, name in enumerate(names):
            if name is None:
                continue
            value = args[i]
            sample = value[0] if isinstance(value, list) else value
            for mutation in MUTATIONS:
                if mutation == "noncontiguous" and (sample.dim() == 0 or sample.shape[-1] < 2):
                    continue
                if mutation == "missing_dim" and sample.dim() == 0:
                    continue
                cases.append(_matrix_case(op_name, i, name, mutation))
    return cases


CASES += _matrix()


def test_every_registered_op_is_fuzzed():
    registered = {name.split("::")[1].split(".")[0]
                  for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU") if name.startswith("hass::")}
    fuzzed = {case.name.split("/")[0] for case in CASES} | {case.name.split("/")[1] for case in CASES
                                                            if case.name.startswith("matrix/")}
    assert registered and registered <= fuzzed, f"ops without fuzz cases: {registered - fuzzed}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_op_input(case):
    outcome, type_name, mro, detail = run_isolated(case.fn)
    assert outcome not in ("crash", "hang"), f"{case.name}: the process did not survive the call ({detail})"
    if case.error is None:
        assert outcome == "ok", f"{case.name}: a valid call raised {type_name}: {detail}"
        return
    assert outcome == "raised", f"{case.name}: no error was raised for a bad input"
    assert case.error.__name__ in mro, f"{case.name}: expected {case.error.__name__}, got {type_name}: {detail}"
    assert re.search(case.match, detail), f"{case.name}: message does not match {case.match!r}: {detail}"
    assert "\n" not in detail.strip(), f"{case.name}: the message is not one line: {detail}"
