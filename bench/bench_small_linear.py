"""small_linear vs torch's linear (BLAS / cuBLAS) for decode-sized calls, weights cold as in a real forward.

CPU (--device cpu):

A decode step reads every weight once, far more than the caches hold, so each layer's weights come from memory.
The benchmark cycles through the linear layers of a whole model body (SmolLM2-135M: 30 layers x q, k, v, o,
gate, up, down) plus its lm_head, for M = 1 .. 64 rows (a one-token step up to a large tree), timing both
implementations interleaved. Also one Llama-3-8B-shaped layer (hidden 4096, 32/8 heads, MLP 14336), fp32.

The ratio row "M vs 1" says how much a forward over M tokens costs relative to a one-token step: what
speculative decoding pays for verifying M tree tokens. Writes bench/results/small_linear_cpu.{json,md}.

CUDA (--device cuda): the Llama-3-8B decode GEMMs (N x K = 4096 x 4096 (o), 6144 x 4096 (qkv), 28672 x 4096
(gate+up), 4096 x 14336 (down), 128256 x 4096 (lm_head)) in bf16 for M = 1 .. 64, small_linear and
small_linear_tc (tensor cores) against F.linear (cuBLAS), each timed over several copies of the weight so that no
call finds it in L2. Reports the time, the bandwidth (weight + x + y bytes over the time) as its share of the
device's peak HBM bandwidth (from a table of known devices; GB/s for others), and the largest difference from
F.linear relative to its largest value.
Writes bench/results/small_linear_<device>.{json,md}.
"""
import math
import re
import time

import torch
import torch.nn.functional as F

from common import interleaved, parser, write

from hass_ext import ops


def layer_shapes(hidden, heads, kv_heads, head_dim, inter):
    q, kv = heads * head_dim, kv_heads * head_dim
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


# Peak HBM bandwidth (bytes/s) by device name, first match: the datasheet figures.
PEAK_BANDWIDTH = ((r"H200", 4.8e12), (r"H100.*(SXM|HBM3)", 3.35e12))
LLAMA3_8B = (("o_proj", 4096, 4096), ("qkv_proj", 6144, 4096), ("gate_up_proj", 28672, 4096),
             ("down_proj", 4096, 14336), ("lm_head", 128256, 4096))
CUDA_ROWS = (1, 2, 4, 8, 16, 32, 60, 64)


def peak_bandwidth(name):
    return next((bw for pat, bw in PEAK_BANDWIDTH if re.search(pat, name)), None)


def time_rotating(fn, weights, calls, repeats):
    """Median seconds per call of fn(w) over `repeats` batches of `calls` calls, each on the next weight copy."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for c in range(calls):
            fn(weights[c % len(weights)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


KERNELS = ("small_linear", "small_linear_tc")  # CUDA: the fp32-FMA kernel and the tensor-core one


def main_cuda(args):
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    shapes, rows_list, dtype = LLAMA3_8B, CUDA_ROWS, torch.bfloat16
    calls, repeats = 20, 5
    if args.quick:
        shapes, rows_list, calls, repeats = (("tiny", 256, 512),), (1, 8), 4, 2
    # more than L2 holds (50-60 MiB on Hopper) between two uses of one copy
    rotate_bytes = 256 * 2 ** 20
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    with torch.inference_mode():
        for layer, N, K in shapes:
            esize = torch.empty((), dtype=dtype).element_size()
            wbytes = N * K * esize
            copies = max(1, math.ceil(rotate_bytes / wbytes))
            weights = [(torch.randn(N, K, generator=g, device="cuda") * 0.02).to(dtype) for _ in range(copies)]
            started = time.monotonic()
            for M in rows_list:
                if time.monotonic() - started > args.shape_budget:
                    print(f"{layer}: M = {M} and larger skipped (over the {args.shape_budget} s per-shape budget)")
                    break
                x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
                ref = F.linear(x, weights[0])
                err = {}
                for kind in KERNELS:
                    ours = getattr(torch.ops.hass, kind)(x, weights[0], None)
                    err[kind] = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)
                                 ).item()
                t = {"cublas": time_rotating(lambda w: F.linear(x, w), weights, calls, repeats)}
                for kind in KERNELS:
                    op = getattr(torch.ops.hass, kind)
                    t[kind] = time_rotating(lambda w: op(x, w, None), weights, calls, repeats)
                nbytes = wbytes + (M * K + M * N) * esize
                row = {"layer": layer, "N": N, "K": K, "rows M": M}
                for kind in (*KERNELS, "cublas"):
                    row[f"{kind} us"] = t[kind] * 1e6
                    row[f"{kind} {'% peak' if peak else 'GB/s'}"] = (100 * nbytes / t[kind] / peak if peak
                                                                     else nbytes / t[kind] / 1e9)
                for kind in KERNELS:
                    row[f"{kind} max rel diff vs cublas"] = err[kind]
                out.append(row)
            del weights
            torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    write(f"small_linear_{slug}", out, args.out_dir, quick=args.quick,
          notes=f"bf16, weights cold (rotating over copies totalling >= {rotate_bytes >> 20} MiB), median of "
                f"{repeats} batches of {calls} calls timed with CUDA events. Bytes = weight + x + y. % peak: of "
                f"{peak / 1e12 if peak else 'unknown'} TB/s ({name}).",
          config={"rows": list(rows_list), "dtype": "bfloat16", "device": name})


def main():
    ap = parser(__doc__)
    ap.add_argument("--shape-budget", type=float, default=8.0,
                    help="CUDA: seconds per weight shape; larger M of a shape are skipped past it")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        return main_cuda(args)
    models = {"SmolLM2-135M body": (layer_shapes(576, 9, 3, 64, 1536) * 30, 0),
              "SmolLM2-135M lm_head": ([(49152, 576)], 0),
              "Llama-3-8B layer": (layer_shapes(4096, 32, 8, 128, 14336), 0)}
    rows_list = (1, 2, 4, 8, 16, 32, 64)
    repeats = 7
    if args.quick:
        models = {"tiny body": (layer_shapes(64, 4, 2, 16, 128) * 2, 0)}
        rows_list, repeats = (1, 4), 2
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.inference_mode():
        for name, (shapes, _) in models.items():
            weights = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]
            widths = sorted({k for _, k in shapes})
            base = {}
            for M in rows_list:
                xs = {k: torch.randn(M, k, generator=g) for k in widths}
                t = interleaved({
                    "blas": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                    "small_linear": lambda: [ops.small_linear(xs[w.shape[1]], w) for w in weights],
                }, "cpu", repeats=repeats, warmup=1)
                if M == 1:
                    base = dict(t)
                mb = sum(w.numel() for w in weights) * 4 / 2 ** 20
                out.append({"weights": name, "MiB": round(mb), "rows M": M,
                            "blas ms": t["blas"] * 1e3, "small_linear ms": t["small_linear"] * 1e3,
                            "speedup": t["blas"] / t["small_linear"],
                            "blas M vs 1": t["blas"] / base["blas"],
                            "small_linear M vs 1": t["small_linear"] / base["small_linear"],
                            "small_linear GB/s": mb * 2 ** 20 / t["small_linear"] / 1e9})
    write("small_linear_cpu", out, args.out_dir, quick=args.quick,
          notes=f"float32, {torch.get_num_threads()} threads, weights cold (each layer once per pass), median of "
                f"{repeats} interleaved passes. 'M vs 1': cost of M rows relative to one row (same implementation).",
          config={"rows": list(rows_list)})


if __name__ == "__main__":
    main()
