#!/usr/bin/env python
"""Time and peak memory of the HASS distillation losses against the HASS reference formulas.

Two comparisons per shape (N tokens, hidden H, vocabulary V):
  logits  ops.distill_loss (forward + backward) vs HASS `compute_loss` on the same logits
          (softmax, log_softmax, p*log q, torch.topk, gather; autograd backward).
  fused   one batch of J alignment steps from hidden states through the frozen head:
          oracle  = HASS: target_p = softmax(head(target)) once, then per step head(x) + compute_loss + backward;
          logits  = the same with ops.distill_loss on the step's logits (target logits once per batch);
          fused   = ops.distill_target_stats once + ops.fused_linear_distill_loss per step (no N x V tensor).
CPU: every run happens in its own process (peak memory = peak RSS growth over the inputs), the variants interleaved
round by round (median over rounds) so that the load of a shared machine affects them alike; report the ratios.
CUDA: absolute times (CUDA events, median), peak allocated memory, and for the logits op the achieved bandwidth
against a device-to-device copy measured in the same run.

  python bench/bench_distill_loss.py            # full shapes (N=2048; on CPU the 4096 x 128256 shape uses --n-large-cpu)
  python bench/bench_distill_loss.py --quick    # tiny shapes, seconds (CPU: in one process, memory not measured)
  python bench/bench_distill_loss.py --shapes large --n-large-cpu 2048 --name bench_loss_cpu_large   # CPU, ~15 quiet min
Writes bench/results/bench_loss[_quick]_<device>.json and .md (or <out-dir>/bench_loss_quick.{json,md}).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hass_ext  # noqa: E402
from hass_ext.speed_eval import machine_info  # noqa: E402
from hass_ext import ops  # noqa: E402
from hass_ext import oracles as R  # noqa: E402

TOPK, CE_W, TOPK_W = 10, 0.1, 1.0


# ---- workloads ------------------------------------------------------------------------------------------------

def make_inputs(case, N, H, V, J, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(N, generator=g) > 0.2).float().to(device)
    if case == "logits":
        z = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype)
        t = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype)
        return {"z": z, "t": t, "mask": mask}
    w = torch.randn(V, H, generator=g).mul_(4.0 / H ** 0.5).to(device=device, dtype=dtype)
    y = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    xs = [torch.randn(N, H, generator=g).to(device=device, dtype=dtype) for _ in range(J)]
    return {"w": w, "y": y, "xs": xs, "mask": mask}


def run_logits_ours(inp):
    z = inp["z"].detach().requires_grad_(True)
    ce, tk = ops.distill_loss(z, inp["t"], inp["mask"], TOPK)
    (CE_W * ce + TOPK_W * tk).backward()


def run_logits_oracle(inp):
    z = inp["z"].detach().requires_grad_(True)
    with torch.no_grad():
        target_p = torch.softmax(inp["t"].float(), dim=-1)
    ploss, tk = R.hass_compute_loss_reference(z[None], target_p[None], inp["mask"][None, :, None], TOPK)
    (CE_W * ploss + TOPK_W * tk).backward()


def run_fused_oracle(inp):
    w, mask = inp["w"], inp["mask"][None, :, None]
    with torch.no_grad():
        target_p = torch.softmax((inp["y"] @ w.T).float(), dim=-1)[None]  # held for the whole batch (HASS)
    for x in inp["xs"]:
        x = x.detach().requires_grad_(True)
        ploss, tk = R.hass_compute_loss_reference((x @ w.T)[None], target_p, mask, TOPK)
        (CE_W * ploss + TOPK_W * tk).backward()


def run_fused_logits_op(inp):
    w = inp["w"]
    with torch.no_grad():
        t = inp["y"] @ w.T
    for x in inp["xs"]:
        x = x.detach().requires_grad_(True)
        ce, tk = ops.distill_loss(x @ w.T, t, inp["mask"], TOPK)
        (CE_W * ce + TOPK_W * tk).backward()


def run_fused_ours(inp):
    w = inp["w"]
    stats = ops.distill_target_stats(inp["y"], w, TOPK)
    for x in inp["xs"]:
        x = x.detach().requires_grad_(True)
        loss, _, _ = ops.fused_linear_distill_loss(x, None, w, inp["mask"], TOPK, CE_W, TOPK_W, target_stats=stats)
        loss.backward()


VARIANTS = {
    "logits": {"oracle": run_logits_oracle, "ours": run_logits_ours},
    "fused": {"oracle": run_fused_oracle, "logits_op": run_fused_logits_op, "ours": run_fused_ours},
}


# ---- measurement ----------------------------------------------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_cpu_child(spec):
    """Runs one variant in this (fresh) process: a warm-up run that also gives the peak resident memory above
    the inputs, then spec["reps"] timed runs."""
    torch.manual_seed(0)
    inp = make_inputs(spec["case"], spec["N"], spec["H"], spec["V"], spec["J"], getattr(torch, spec["dtype"]), "cpu")
    fn = VARIANTS[spec["case"]][spec["variant"]]
    try:  # reset the peak RSS (VmHWM) so that building the inputs does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = _status_kib("VmRSS")
    fn(inp)
    peak = (_status_kib("VmHWM") - rss0) * 1024
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        fn(inp)
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "peak_bytes": max(0, peak)}


def measure_cpu(spec):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {spec}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_cuda(spec, reps):
    inp = make_inputs(spec["case"], spec["N"], spec["H"], spec["V"], spec["J"], getattr(torch, spec["dtype"]), "cuda")
    fn = VARIANTS[spec["case"]][spec["variant"]]
    fn(inp)  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inp)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(inp)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def copy_bandwidth_cuda(nbytes=1 << 30, reps=10):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        dst.copy_(src)
    b.record()
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (a.elapsed_time(b) / 1e3)  # read + write


# ---- driver ---------------------------------------------------------------------------------------------------

def logits_bytes(N, V, dtype):
    e = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    return {"forward": 2 * N * V * e, "backward": 3 * N * V * e}  # read z, t (+ write dz)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=2048, help="tokens per batch")
    ap.add_argument("--n-large-cpu", type=int, default=256,
                    help="tokens for the H=4096, V=128256 shape on CPU (the full N needs minutes and ~6 GB there)")
    ap.add_argument("--steps", type=int, default=3, help="alignment steps J per batch in the fused comparison")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--shapes", default="small,large", help="which of small (576 x 49152), large (4096 x 128256)")
    ap.add_argument("--memory-only", action="store_true",
                    help="CPU: one untimed run per variant, for the peak memory at sizes too slow to time")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default=None,
                    help="file name of the results (default bench_loss[_quick]_<device>[_memory])")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_cpu_child(json.loads(args.child))))
        return

    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    if args.quick:
        shapes = [(64, 32, 1000)]
    else:
        named = {"small": (args.n, 576, 49152), "large": (args.n if cuda else args.n_large_cpu, 4096, 128256)}
        shapes = [named[s] for s in args.shapes.split(",")]
    reps = args.reps or (1 if args.quick else (20 if cuda else 3))
    results = {"machine": machine_info(args.device), "dtype": dtype, "topk": TOPK, "steps": args.steps, "rows": []}
    if cuda:
        results["copy_bandwidth_GBps"] = copy_bandwidth_cuda() / 1e9
    for N, H, V in shapes:
        for case, variants in VARIANTS.items():
            specs = [{"case": case, "variant": v, "N": N, "H": H, "V": V, "J": args.steps, "dtype": dtype}
                     for v in variants]
            if cuda:
                measured = [measure_cuda(dict(sp, reps=reps), reps) for sp in specs]
            elif args.quick:  # a smoke run: in-process, memory not isolated
                measured = [dict(time_s=measure_cpu_child(dict(sp, reps=1))["times_s"][0], peak_bytes=None)
                            for sp in specs]
            elif args.memory_only:
                measured = [dict(time_s=None, peak_bytes=measure_cpu(dict(sp, reps=0))["peak_bytes"]) for sp in specs]
            else:  # one process per run, variants interleaved round by round against load drift
                runs = [[measure_cpu(dict(sp, reps=1)) for sp in specs] for _ in range(reps)]
                measured = [{"time_s": statistics.median(r[i]["times_s"][0] for r in runs),
                             "peak_bytes": max(r[i]["peak_bytes"] for r in runs)} for i in range(len(specs))]
            for spec, r in zip(specs, measured):
                row = dict(spec, **r)
                if cuda and case == "logits" and spec["variant"] == "ours":
                    # forward + backward move 5 N*V elements; report the achieved rate against the copy rate
                    moved = sum(logits_bytes(N, V, dtype).values())
                    row["GBps"] = moved / r["time_s"] / 1e9
                    row["of_copy_bandwidth"] = row["GBps"] / results["copy_bandwidth_GBps"]
                results["rows"].append(row)
                print(f"{case:7s} {spec['variant']:10s} N={N} H={H} V={V}: {_ms(r['time_s'])} ms, "
                      f"peak {_mib(r['peak_bytes'])} MiB", flush=True)
    write_results(results, args)


def _mib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def write_results(results, args):
    os.makedirs(args.out_dir, exist_ok=True)
    name = "bench_loss_quick" if args.quick else f"bench_loss_{args.device}"
    name = args.name or name + ("_memory" if args.memory_only else "")
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    m = results["machine"]
    lines = [f"# Distillation loss benchmark ({args.device})", "",
             f"{m['date']}; CPU {m['cpu']} ({m['cpu_cores']} cores, {m['threads']} torch threads); "
             f"torch {m['torch']}" + (f"; GPU {m['device']}, CUDA {m['cuda']}" if m['device'] != "cpu" else "") + "; "
             f"{results['dtype']} inputs, K={results['topk']}, J={results['steps']} alignment steps per batch.", ""]
    if args.memory_only:
        lines += ["Memory-only run: one untimed run per variant, each in its own process.", ""]
    if "copy_bandwidth_GBps" in results:
        lines += [f"Device-to-device copy bandwidth measured in this run: {results['copy_bandwidth_GBps']:.0f} GB/s.", ""]
    lines += ["| case | variant | N | H | V | time (ms) | speed-up vs oracle | peak extra memory (MiB) | memory vs oracle |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = results["rows"]
    for r in rows:
        o = next(x for x in rows if x["case"] == r["case"] and x["variant"] == "oracle" and x["N"] == r["N"]
                 and x["V"] == r["V"])
        speed = f"{o['time_s'] / r['time_s']:.2f}x" if r["time_s"] and o["time_s"] else "n/a"
        mem = f"{r['peak_bytes'] / o['peak_bytes']:.3f}" if r["peak_bytes"] and o["peak_bytes"] else "n/a"
        extra = f" ({r['GBps']:.0f} GB/s, {100 * r['of_copy_bandwidth']:.0f} % of copy)" if "GBps" in r else ""
        lines.append(f"| {r['case']} | {r['variant']} | {r['N']} | {r['H'] if r['case'] == 'fused' else '-'} | "
                     f"{r['V']} | {_ms(r['time_s'])}{extra} | {speed} | "
                     f"{_mib(r['peak_bytes'])} | {mem} |")
    lines += ["", "logits: forward + backward of the loss on given [N, V] logits. fused: one batch = target side once "
              "+ J steps of head GEMM, loss and backward to the hidden states. Peak memory excludes the inputs."]
    with open(os.path.join(args.out_dir, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
