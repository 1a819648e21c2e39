"""Benchmark of hass_ext's tree-masked and alignment attention, side by side in one run.

Tree attention (verification of an n-node tree over a prefix), Llama-3-8B shapes (32 query heads, 8 KV heads,
head_dim 128), prefix 1k and 4k, n = 60, against what a user would otherwise run:
  - transformers' sdpa path: the KV heads repeated for GQA (repeat_kv), then SDPA with the additive float
    [B, 1, n, L] tree mask (what a stock model does when it is handed a 4D mask),
  - SDPA with the boolean visibility mask and enable_gqa (no repeated KV heads),
  - causal SDPA over the same keys (bottom-right aligned: query i sees prefix + tree keys up to i; flash
    attention on a GPU): the speed ceiling, same work without the tree,
  - the oracle (explicit mask + softmax).
Alignment attention (HASS training, step F = 3, T = 2048), forward + backward, against the oracle and against
causal SDPA of the same length (the flash-attention ceiling), with peak memory.

CPU: fp32, times are medians of interleaved runs, reported as ratios (the CPUs are shared and noisy). CUDA: bf16,
absolute times from CUDA events. Writes bench/results/attention_<device>.json and .md.

--decode: one attention layer of a decode-time verification instead, SmolLM2-135M shapes (9 query heads, 3 KV
heads, head_dim 64), small trees (n = 6, 16, 60) over prefixes of 128 and 512, against what transformers' sdpa
attention does with the 4D tree mask (the KV heads repeated for GQA, then masked SDPA), masked SDPA with
enable_gqa, and one-query SDPA (a vanilla decode step's attention). Writes attention_decode_<device>.json / .md.
Usage: python bench/bench_tree_attention.py [--device cpu|cuda] [--quick] [--decode] [--tree-only] [--reps N]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hass_ext  # noqa: E402
from hass_ext.speed_eval import machine_info  # noqa: E402
from hass_ext import ops  # noqa: E402
from hass_ext.oracles import align_attention_oracle  # noqa: E402
from hass_ext.oracles import tree_attention_mask, tree_attention_oracle  # noqa: E402

FULL = dict(Hq=32, Hkv=8, d=128, n=60, prefixes=(1024, 4096), T=2048, F=3, align_Hq=32, align_Hkv=8)
# On the CPU the oracle's fp32 [F, B, H, T, T] score tensors would need ~10 GiB at 32 heads: the alignment case
# runs a quarter of the heads there (times and memory scale linearly with the head count; ratios do not change).
FULL_CPU = dict(FULL, align_Hq=8, align_Hkv=2)
QUICK = dict(Hq=4, Hkv=2, d=64, n=12, prefixes=(64, 192), T=96, F=3, align_Hq=4, align_Hkv=2)
TRANSFORMERS = "transformers sdpa (repeat_kv + float mask)"
CEILING = "causal SDPA, same keys (ceiling)"
DECODE = dict(Hq=9, Hkv=3, d=64, trees=(6, 16, 60), prefixes=(128, 512))
DECODE_QUICK = dict(Hq=4, Hkv=2, d=32, trees=(6,), prefixes=(32,))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(fns, device, reps, warmup=1):
    """Median seconds per function, the functions interleaved rep by rep so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_tree_mask(n, gen):
    parents = [-1] + [int(torch.randint(max(0, i - 8), i, (1,), generator=gen)) for i in range(1, n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def bench_tree(cfg, device, dtype, reps):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for prefix in cfg["prefixes"]:
        n, L = cfg["n"], prefix + cfg["n"]
        q = torch.randn(1, cfg["Hq"], n, cfg["d"], generator=gen).to(device, dtype)
        k = torch.randn(1, cfg["Hkv"], L, cfg["d"], generator=gen).to(device, dtype)
        v = torch.randn(1, cfg["Hkv"], L, cfg["d"], generator=gen).to(device, dtype)
        mask = random_tree_mask(n, gen)[None].to(device)
        visible = tree_attention_mask(mask, L)[:, None]  # [B, 1, n, L], built once like a model's 4D mask
        additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
        causal = causal_lower_right(n, L)
        group = cfg["Hq"] // cfg["Hkv"]
        fns = {
            "hass tree_attention": lambda: ops.tree_attention(q, k, v, mask),
            TRANSFORMERS: lambda: F.scaled_dot_product_attention(
                q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=additive),
            "SDPA + bool mask, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                                                   enable_gqa=True),
            CEILING: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True),
            "oracle": lambda: tree_attention_oracle(q, k, v, mask),
        }
        t = time_side_by_side(fns, device, reps)
        ours = t["hass tree_attention"]
        rows.append(dict(prefix=prefix, n=n, L=L, times_s=t,
                         ratio_vs_causal=ours / t[CEILING],
                         ratio_vs_transformers=ours / t[TRANSFORMERS],
                         ratio_vs_oracle=ours / t["oracle"]))
        print(f"tree prefix={prefix} n={n}: " + ", ".join(f"{k_}={v_ * 1e3:.3f} ms" for k_, v_ in t.items()),
              flush=True)
    return rows


def bench_decode(cfg, device, dtype, reps):
    rows = []
    gen = torch.Generator().manual_seed(0)
    group = cfg["Hq"] // cfg["Hkv"]
    for prefix in cfg["prefixes"]:
        for n in cfg["trees"]:
            L = prefix + n
            q = torch.randn(1, cfg["Hq"], n, cfg["d"], generator=gen).to(device, dtype)
            k = torch.randn(1, cfg["Hkv"], L, cfg["d"], generator=gen).to(device, dtype)
            v = torch.randn(1, cfg["Hkv"], L, cfg["d"], generator=gen).to(device, dtype)
            mask = random_tree_mask(n, gen)[None].to(device)
            additive = torch.zeros(1, 1, n, L, dtype=dtype, device=device)
            additive.masked_fill_(~tree_attention_mask(mask, L)[:, None], torch.finfo(dtype).min)
            fns = {
                "hass tree_attention": lambda: ops.tree_attention(q, k, v, mask),
                "transformers sdpa (repeat_kv + mask)": lambda: F.scaled_dot_product_attention(
                    q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=additive),
                "SDPA + mask, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive,
                                                                                  enable_gqa=True),
                "one-query SDPA (decode step)": lambda: F.scaled_dot_product_attention(q[:, :, :1], k, v,
                                                                                       enable_gqa=True),
            }
            t = time_side_by_side(fns, device, reps, warmup=3)
            rows.append(dict(prefix=prefix, n=n, L=L, times_s=t))
            print(f"decode prefix={prefix} n={n}: " + ", ".join(f"{k_}={v_ * 1e6:.1f} us" for k_, v_ in t.items()),
                  flush=True)
    return rows


def decode_markdown(res):
    info = res["machine"]
    names = list(res["decode"][0]["times_s"])
    lines = [f"# Decode-time tree attention, one layer ({res['device']}, {res['dtype']}"
             f"{', quick shapes' if res['quick'] else ''})", "",
             f"{info['date']}; CPU {info['cpu']} ({info['cpu_cores']} cores, {info['threads']} torch threads)"
             + (f"; GPU {info['device']}" if info['device'] != "cpu" else "") + f"; torch {info['torch']}.", "",
             f"Shapes: {res['shapes']}; medians of {res['reps']} interleaved runs.", "",
             "| prefix | n | " + " | ".join(names) + " | hass / transformers sdpa |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for r in res["decode"]:
        t = r["times_s"]
        lines.append(f"| {r['prefix']} | {r['n']} | " + " | ".join(f"{t[k] * 1e6:.1f} us" for k in names) +
                     f" | {t['hass tree_attention'] / t['transformers sdpa (repeat_kv + mask)']:.2f}x |")
    return "\n".join(lines + [""])


def align_inputs(cfg, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, Fs = cfg["T"], cfg["F"]
    Hq, Hkv = cfg["align_Hq"], cfg["align_Hkv"]
    q = torch.randn(1, Hq, T, cfg["d"], generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(Fs, 1, Hkv, T, cfg["d"], generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(Fs, 1, Hkv, T, cfg["d"], generator=gen).to(device, dtype).requires_grad_()
    go = torch.randn(1, Hq, T, cfg["d"], generator=gen).to(device, dtype)
    return q, k, v, go


def align_fns(cfg, device, dtype):
    q, k, v, go = align_inputs(cfg, device, dtype)
    kc, vc = k[0].detach().clone().requires_grad_(), v[0].detach().clone().requires_grad_()

    def ours():
        ops.align_attention(q, k, v).backward(go)

    def oracle():
        align_attention_oracle(q, k, v).backward(go)

    def causal():
        F.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True).backward(go)

    return {"hass align_attention fwd+bwd": ours, "oracle fwd+bwd": oracle, "SDPA causal fwd+bwd (ceiling)": causal}


def peak_memory_cuda(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_mib(fn):
    """Peak extra resident memory (MiB) of one call of fn, from Linux's resettable high-water mark."""
    fn()  # warm-up: allocator caches, BLAS buffers
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kib("VmHWM")  # read after the reset: RSS may shrink in between (pages reclaimed), HWM cannot
    fn()
    # Linux syncs its per-thread RSS counters lazily: a call that allocates nothing can read a little below base
    return max(0.0, (_rss_kib("VmHWM") - base) / 1024)


def peak_memory_cpu(which, quick):
    """Peak extra memory of one fwd+bwd; full runs measure in a fresh interpreter (no reused heap)."""
    if quick:
        return peak_rss_mib(align_fns(QUICK, "cpu", torch.float32)[which])
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", which]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return float(out.stdout.strip().splitlines()[-1])


def mem_child(which):
    print(peak_rss_mib(align_fns(FULL_CPU, "cpu", torch.float32)[which]))


def bench_align(cfg, device, dtype, reps, quick):
    fns = align_fns(cfg, device, dtype)
    t = time_side_by_side(fns, device, reps)
    mem = {name: (peak_memory_cuda(fn) if device == "cuda" else peak_memory_cpu(name, quick))
           for name, fn in fns.items()}
    ours = t["hass align_attention fwd+bwd"]
    row = dict(T=cfg["T"], F=cfg["F"], Hq=cfg["align_Hq"], Hkv=cfg["align_Hkv"], times_s=t, peak_mib=mem,
               ratio_vs_causal=ours / t["SDPA causal fwd+bwd (ceiling)"], ratio_vs_oracle=ours / t["oracle fwd+bwd"],
               memory_vs_oracle=mem["hass align_attention fwd+bwd"] / max(mem["oracle fwd+bwd"], 1e-9))
    print(f"align T={cfg['T']} F={cfg['F']}: " + ", ".join(f"{k_}={v_ * 1e3:.1f} ms" for k_, v_ in t.items()))
    print("  peak MiB: " + ", ".join(f"{k_}={v_:.1f}" for k_, v_ in mem.items()), flush=True)
    return row


def markdown(res):
    info, unit = res["machine"], "ms"
    lines = [f"# Attention benchmark ({res['device']}, {res['dtype']}{', quick shapes' if res['quick'] else ''})", "",
             f"{info['date']}; CPU {info['cpu']} ({info['cpu_cores']} cores, {info['threads']} torch threads)"
             + (f"; GPU {info['device']}" if info['device'] != "cpu" else "") + f"; torch {info['torch']}.", "",
             f"Shapes: {res['shapes']}.", "",
             "## Tree attention (n tree queries over prefix + tree keys)", "",
             "| prefix | n | " + " | ".join(res["tree"][0]["times_s"]) + " | hass / ceiling | hass / transformers |",
             "|---|---|" + "---|" * (len(res["tree"][0]["times_s"]) + 2)]
    for r in res["tree"]:
        t = r["times_s"]
        lines.append(f"| {r['prefix']} | {r['n']} | " + " | ".join(f"{x * 1e3:.3f} {unit}" for x in t.values()) +
                     f" | {r['ratio_vs_causal']:.2f}x | {r['ratio_vs_transformers']:.2f}x |")
    a = res.get("align")
    if a is None:
        return "\n".join(lines + [""])
    t, m = a["times_s"], a["peak_mib"]
    lines += ["", f"## Alignment attention, forward + backward (T = {a['T']}, F = {a['F']}, "
              f"{a['Hq']} query / {a['Hkv']} KV heads)", "",
              "| | time | peak memory |", "|---|---|---|"]
    for name in t:
        lines.append(f"| {name} | {t[name] * 1e3:.1f} {unit} | {m[name]:.1f} MiB |")
    lines += ["", f"hass / causal SDPA: {a['ratio_vs_causal']:.2f}x time; hass / oracle: {a['ratio_vs_oracle']:.2f}x time, "
              f"{a['memory_vs_oracle']:.3f}x memory.", ""]
    if res["device"] == "cpu":
        lines += ["CPU times are medians of interleaved runs on a shared machine: read the ratios, not the "
                  "absolute numbers.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if "cuda" in hass_ext.available_devices() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--decode", action="store_true", help="decode-time trees at SmolLM2 shapes (module docstring)")
    ap.add_argument("--out-dir", "--out", dest="out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--tree-only", action="store_true", help="skip the alignment-attention benchmark")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        return mem_child(args.mem_child)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.decode:
        cfg = DECODE_QUICK if args.quick else DECODE
        reps = args.reps or (3 if args.quick else (50 if device == "cuda" else 200))
        res = dict(device=device, dtype=str(dtype).replace("torch.", ""), quick=args.quick,
                   machine=machine_info(device), shapes=dict(B=1, **{k: (list(v) if isinstance(v, tuple) else v)
                                                                    for k, v in cfg.items()}), reps=reps)
        res["decode"] = bench_decode(cfg, device, dtype, reps)
        return _write(res, args.out, f"attention_decode_{device}" + ("_quick" if args.quick else ""),
                      decode_markdown(res))
    cfg = QUICK if args.quick else (FULL if device == "cuda" else FULL_CPU)
    reps = args.reps or (3 if args.quick else (50 if device == "cuda" else 5))
    res = dict(device=device, dtype=str(dtype).replace("torch.", ""), quick=args.quick, machine=machine_info(device),
               shapes=dict(B=1, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}), reps=reps)
    res["tree"] = bench_tree(cfg, device, dtype, reps)
    if not args.tree_only:
        res["align"] = bench_align(cfg, device, dtype, max(1, reps // 2) if device == "cpu" else reps, args.quick)
    _write(res, args.out, f"attention_{device}" + ("_quick" if args.quick else ""), markdown(res))


def _write(res, out, name, md):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(md)
    print(f"wrote {os.path.join(out, name)}.json/.md")


if __name__ == "__main__":
    main()
