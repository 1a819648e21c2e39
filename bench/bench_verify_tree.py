"""Benchmark of hass_ext.ops.verify_tree against its PyTorch oracle (hass_ext.oracles.verify_tree_oracle).

Shapes from the issue: (n=60, V=128256) (Llama-3 vocabulary, the paper's 60-node tree) and (n=16, V=49152)
(SmolLM2), batch B in {1, 8}, greedy and sampled (T=1; T=1 with top-p 0.9; T=1 with top-p 0.9 and top-k 50).
--llama keeps only the Llama-3 shape in bf16 (the GPU check's case). The tree is an
EAGLE-2-like 6-level tree whose first children mostly carry the target's argmax, so the walk goes a few levels
deep, as in real decoding. CPU: op and oracle timed alternately in one run, the ratio is what counts (shared,
noisy CPUs). CUDA: absolute times, eager (includes the one status read) and CUDA-graph replay (kernels only).
Writes bench/results/verify_tree.json and .md.

    python bench/bench_verify_tree.py [--quick] [--llama] [--device cpu|cuda|all] [--repeats N] [--results-dir DIR]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hass_ext  # noqa: E402
from hass_ext.speed_eval import machine_info  # noqa: E402
from hass_ext.ops import verify_tree  # noqa: E402
from hass_ext.oracles import verify_tree_oracle  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = [("greedy", 0.0, 1.0, 0), ("T=1", 1.0, 1.0, 0), ("T=1 p=.9", 1.0, 0.9, 0), ("T=1 p=.9 k=50", 1.0, 0.9, 50)]


def eagle_tree(n, levels=6, seed=0):
    """parents [n]: level sizes grow then shrink like EAGLE-2's top-k selection; children attach to the first
    (best-scored) nodes of the previous level."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([10, 14, 14, 10, 7, 4][:levels], dtype=torch.float)
    sizes = (weights / weights.sum() * (n - 1)).floor().long()
    sizes[0] += (n - 1) - int(sizes.sum())
    parents, prev = [-1], [0]
    for s in sizes.tolist():
        cur = []
        for _ in range(s):
            k = min(len(prev), 3)
            parents.append(prev[int(torch.randint(0, k, (1,), generator=g))])
            cur.append(len(parents) - 1)
        prev = cur or prev
    return torch.tensor(parents[:n])


def make_inputs(B, n, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    parents = eagle_tree(n, seed=seed).expand(B, n).contiguous()
    logits = torch.randn(B, n, V, generator=g) * 2.0
    top = logits.argmax(-1)  # peak it: the argmax gets probability ~0.7 at T = 1, as a confident LM would
    logits.scatter_(-1, top[..., None], float(torch.log(torch.tensor(V * 2.3))) + 2.0)
    tokens = torch.randint(0, V, (B, n), generator=g)
    first_child = torch.zeros(B, n, dtype=torch.bool)
    seen = set()
    for i in range(1, n):  # the first child of every node drafts the parent's argmax (a good draft)
        p = int(parents[0, i])
        if p not in seen:
            seen.add(p)
            first_child[:, i] = True
    for i in range(1, n):
        if first_child[0, i]:
            tokens[:, i] = top[torch.arange(B), parents[:, i]]
    return logits.to(dtype).to(device), tokens.to(device), parents.to(device)


def cpu_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_times(fn, repeats):
    """(eager µs per call, graph-replay µs per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    eager = start.elapsed_time(end) * 1e3 / repeats
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(1, repeats // 20)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return eager, start.elapsed_time(end) * 1e3 / (reps * 20)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--llama", action="store_true", help="only n=60, V=128256 (bf16 on CUDA)")
    ap.add_argument("--out", default=None,
                    help="results file stem (default verify_tree on the CPU only, verify_tree_cuda with a GPU)")
    ap.add_argument("--out-dir", "--results-dir", dest="results_dir", default=RESULTS, help="where the .json and .md go (default bench/results)")
    args = ap.parse_args(argv)

    shapes = [(60, 128256), (16, 49152)] if not args.quick else [(12, 500), (5, 97)]
    if args.llama:
        shapes = shapes[:1]
    batches = [1, 8] if not args.quick else [1, 2]
    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device in ("cuda", "all") and "cuda" in hass_ext.available_devices():
        devices.append("cuda")
    rows = []
    for device in devices:
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16] + ([] if args.llama else [torch.float32])
        for (n, V) in shapes:
            for B in batches:
                for dtype in dtypes:
                    logits, tokens, parents = make_inputs(B, n, V, dtype, device)
                    for name, T, top_p, top_k in MODES:
                        # CUDA: the default generator, which CUDA-graph capture registers by itself.
                        gen = torch.Generator().manual_seed(0) if device == "cpu" else None
                        if device == "cuda":
                            torch.cuda.manual_seed(0)
                        op = lambda: verify_tree(logits, tokens, parents, T, top_p, top_k, generator=gen)  # noqa
                        ref = lambda: verify_tree_oracle(logits, tokens, parents, T, top_p, top_k,  # noqa
                                                            generator=gen)
                        alen = float(op()[1].float().mean())
                        row = dict(device=device, n=n, V=V, B=B, dtype=str(dtype).replace("torch.", ""),
                                   mode=name, mean_accept_len=round(alen, 2))
                        if device == "cpu":
                            reps = args.repeats or (3 if args.quick else 5)
                            t_op, t_ref = [], []
                            for _ in range(reps):  # alternate, so both see the same machine load
                                t_op.append(cpu_time(op, 1))
                                t_ref.append(cpu_time(ref, 1))
                            row.update(op_ms=statistics.median(t_op) * 1e3, oracle_ms=statistics.median(t_ref) * 1e3)
                            row["speedup_vs_oracle"] = row["oracle_ms"] / row["op_ms"]
                        else:
                            reps = args.repeats or (20 if args.quick else 200)
                            eager, graph = cuda_times(op, reps)
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            ref()
                            torch.cuda.synchronize()
                            row.update(op_eager_us=eager, op_graph_us=graph,
                                       oracle_us=(time.perf_counter() - t0) * 1e6)
                            row["speedup_vs_oracle"] = row["oracle_us"] / graph
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    info = machine_info()
    if args.out is None:  # a GPU run must not overwrite the committed CPU results
        args.out = "verify_tree_cuda" if "cuda" in devices else "verify_tree"
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, args.out + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "results": rows}, f, indent=1)
    lines = [f"# verify_tree benchmark ({info['date']})", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "date"), ""]
    cpu_rows = [r for r in rows if r["device"] == "cpu"]
    if cpu_rows:
        lines += ["## CPU: op vs oracle (median ms, same run)", "",
                  "| n | V | B | dtype | mode | accept len | op ms | oracle ms | speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['V']} | {r['B']} | {r['dtype']} | {r['mode']} | {r['mean_accept_len']} | "
                  f"{r['op_ms']:.3f} | {r['oracle_ms']:.2f} | {r['speedup_vs_oracle']:.1f}x |" for r in cpu_rows]
        lines.append("")
    gpu_rows = [r for r in rows if r["device"] == "cuda"]
    if gpu_rows:
        lines += ["## CUDA: µs per call (graph replay = kernels only; eager adds launch + the status read)", "",
                  "| n | V | B | dtype | mode | accept len | graph µs | eager µs | oracle µs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['V']} | {r['B']} | {r['dtype']} | {r['mode']} | {r['mean_accept_len']} | "
                  f"{r['op_graph_us']:.1f} | {r['op_eager_us']:.1f} | {r['oracle_us']:.0f} |" for r in gpu_rows]
        lines.append("")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
