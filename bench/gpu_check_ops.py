"""One call of every CUDA op on tiny inputs, each compared with the op's CPU kernel: the workload that
bench/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck), small enough to finish there in seconds.

The cases hit the kernels' edge paths: tree attention with a ragged prefix and key splits (the merge kernel),
alignment attention with T < F (no level-0 key: the case of the fixed missing barrier) and over several tiles,
verify_tree greedy and with top-p / top-k filters, compact_kv, distill_loss forward and backward, small_linear
with whole 16-byte chunks and with a K tail, and its row invariance (60 rows at once give each row the bits of a
one-row call); small_linear_tc likewise, with a partial 64-k block and a K split over 8 warps.

    python bench/gpu_check_ops.py [--device cuda|cpu]
--device cpu runs the same cases with the CPU kernels against themselves (checks this script, not the kernels).
Exits non-zero when a case disagrees with the CPU kernel.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hass_ext import ops  # noqa: E402


def tree_attention(dev, gen):
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 128)):  # sm90 kernel x2, fallback
        B, Hq, Hkv, n, L = 2, 4, 2, 5, 140
        q, k, v = (torch.randn(B, h, s, d, generator=gen).to(dtype) for h, s in ((Hq, n), (Hkv, L), (Hkv, L)))
        mask = torch.tril(torch.rand(B, n, n, generator=gen) < 0.5) | torch.eye(n, dtype=torch.bool)
        prefix = torch.tensor([L - n, L - n - 37])
        want = ops.tree_attention(q, k, v, mask, prefix_lens=prefix)
        got = ops.tree_attention(*(x.to(dev) for x in (q, k, v, mask)), prefix_lens=prefix.to(dev))
        yield f"tree_attention {dtype} d={d}", got, want, 2e-2 if dtype != torch.float32 else 1e-5


def align_attention(dev, gen):
    for dtype, d, T, F in ((torch.float32, 128, 3, 4), (torch.bfloat16, 64, 70, 3)):
        q = torch.randn(1, 4, T, d, generator=gen).to(dtype)
        k, v = (torch.randn(F, 1, 2, T, d, generator=gen).to(dtype) for _ in range(2))
        go = torch.randn(1, 4, T, d, generator=gen).to(dtype)
        outs = []
        for device in ("cpu", dev):
            leaves = [x.detach().to(device).requires_grad_() for x in (q, k, v)]  # a fresh leaf per device
            out = ops.align_attention(*leaves)
            out.backward(go.to(device))
            outs.append([out] + [x.grad for x in leaves])
        tol = 2e-2 if dtype != torch.float32 else 1e-5
        for name, got, want in zip(("out", "dq", "dk", "dv"), outs[1], outs[0]):
            yield f"align_attention {name} {dtype} d={d} T={T} F={F}", got, want, tol


def verify_tree(dev, gen):
    B, n, V = 2, 7, 3000
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3]] * B)
    logits = (torch.randn(B, n, V, generator=gen) * 3).to(torch.bfloat16)
    tokens = logits.float().argmax(-1)[:, parents[0].clamp(min=0)]  # every node drafts its parent's argmax
    u = torch.rand(B, n, generator=gen)
    for T, top_p, top_k in ((0.0, 1.0, 0), (1.0, 0.9, 0), (0.8, 0.8, 20)):
        want = ops.verify_tree(logits, tokens, parents, T, top_p, top_k, uniforms=u)
        got = ops.verify_tree(*(x.to(dev) for x in (logits, tokens, parents)), T, top_p, top_k, uniforms=u.to(dev))
        for name, g, w in zip(("accepted", "accept_len", "next_token"), got, want):
            yield f"verify_tree T={T} top_p={top_p} top_k={top_k} {name}", g, w, 0.0


def compact_kv(dev, gen):
    caches = torch.randn(4, 2, 2, 32, 16, generator=gen)
    src = torch.tensor([[20, 22, 25], [21, -1, -1]])
    want = caches.clone()
    ops.compact_kv(want, src, 20)
    got = caches.to(dev)
    ops.compact_kv(got, src.to(dev), 20)
    yield "compact_kv", got, want, 0.0


def distill_loss(dev, gen):
    z, t = (torch.randn(2, 6, 1000, generator=gen) for _ in range(2))
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])
    outs = []
    for device in ("cpu", dev):
        zz = z.detach().to(device).requires_grad_()  # a fresh leaf per device
        ce, topk = ops.distill_loss(zz, t.to(device), mask.to(device))
        (ce + topk).backward()
        outs.append((ce, topk, zz.grad))
    for name, got, want in zip(("ce", "topk", "grad"), outs[1], outs[0]):
        yield f"distill_loss {name}", got, want, 1e-4


def small_linear(dev, gen):
    # The CPU kernel is the reference: both widen exactly, so only the summation order and the final rounding to
    # x's dtype differ.
    pairs = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float16), (torch.bfloat16, torch.float16)]
    for xdtype, wdtype in pairs:
        for K in (256, 203):  # 16-byte loads; a partial last chunk (scalar loads)
            N = 37
            x = torch.randn(60, K, generator=gen).to(xdtype)
            w = (torch.randn(N, K, generator=gen) * 0.1).to(wdtype)
            b = torch.randn(N, generator=gen).to(xdtype)
            with torch.inference_mode():
                want = ops.small_linear(x, w, b)
                xd, wd, bd = x.to(dev), w.to(dev), b.to(dev)
                got = torch.ops.hass.small_linear(xd, wd, bd)
                rows = torch.cat([torch.ops.hass.small_linear(xd[m:m + 1], wd, bd) for m in range(60)])
            name = f"small_linear x {xdtype} w {wdtype} K={K}"
            yield name, got, want, 1e-5 if xdtype == torch.float32 else 1e-2
            yield f"{name} rows M=1 vs M=60", rows, got, 0.0


def small_linear_tc(dev, gen):
    # Against the CPU kernel (small_linear there): another summation order, so a tolerance; row invariance bitwise.
    # K = 1000: a partial last 64-k block; N = 37: a partial 16-column slab; N = 300 splits K over 8 warps (the
    # shared-memory reduction racecheck looks at).
    for dtype in (torch.bfloat16, torch.float16):
        for N, K in ((37, 1000), (300, 512)):
            x = torch.randn(60, K, generator=gen).to(dtype)
            w = (torch.randn(N, K, generator=gen) * 0.1).to(dtype)
            b = torch.randn(N, generator=gen).to(dtype)
            with torch.inference_mode():
                want = ops.small_linear_tc(x, w, b)
                xd, wd, bd = x.to(dev), w.to(dev), b.to(dev)
                got = torch.ops.hass.small_linear_tc(xd, wd, bd)
                rows = torch.cat([torch.ops.hass.small_linear_tc(xd[m:m + 1], wd, bd) for m in range(60)])
            name = f"small_linear_tc {dtype} N={N} K={K}"
            yield name, got, want, 1e-2
            yield f"{name} rows M=1 vs M=60", rows, got, 0.0


CASES = (tree_attention, align_attention, verify_tree, compact_kv, distill_loss, small_linear, small_linear_tc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    failed = 0
    for case in CASES:
        for name, got, want, tol in case(args.device, gen):
            got, want = got.detach().cpu(), want.detach().cpu()
            if tol == 0.0:
                ok = torch.equal(got, want)
                err = 0.0 if ok else float("nan")
            else:
                err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=0.1)).item()
                ok = err <= tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f" (relative error {err:.2e})" if tol else ""), flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"{failed} case(s) failed" if failed else "all cases agree with the CPU kernels")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
