"""Shared benchmark plumbing: timing (CPU wall clock or CUDA events), peak memory, machine info, result files."""
import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hass_ext.speed_eval import machine_info  # noqa: E402
from hass_ext.timing import time_call  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (checks that it runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default=RESULTS)
    return ap


def time_fn(fn, device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() over repeats (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = [time_call(fn, device) for _ in range(repeats)]
    return statistics.median(times)


def interleaved(fns: dict, device, repeats: int = 20, warmup: int = 3, setup=None, stat=statistics.median) -> dict:
    """Median seconds (or ``stat`` of the samples) of several functions timed alternately, so a noisy shared CPU
    affects all alike. setup: called (untimed) before every call, e.g. to put back a state the functions change."""
    setup = setup or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            setup()
            fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            setup()
            samples[k].append(time_fn(fn, device, repeats=1, warmup=0))
    return {k: stat(v) for k, v in samples.items()}


def peak_memory(fn, device) -> int:
    """Peak bytes allocated while fn() runs: CUDA allocator stats on a GPU; on the CPU the running sum of the
    profiler's per-op allocations/frees (frees outside any op are not seen, so it can overestimate)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = cur = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += ev.self_cpu_memory_usage or 0  # allocations and frees attributed to ops
        peak = max(peak, cur)
    return peak


def write(name: str, rows: list, out_dir: str, notes: str = "", quick: bool = False, config: dict = None,
          extra: dict = None) -> str:
    """bench/results/<name>.json and .md; the table has one column per key of the rows. config: the run's
    settings (shapes, dtype, ...), kept in the JSON and listed above the table; extra: more JSON-only keys."""
    os.makedirs(out_dir, exist_ok=True)
    if quick:
        name += "-quick"
    info = machine_info()
    doc = {"benchmark": name, "machine": info, "notes": notes, "rows": rows,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if config:
        doc["config"] = config
    doc.update(extra or {})
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(doc, f, indent=2)
    keys = list(rows[0]) if rows else []
    lines = [f"# {name}", "", f"Machine: {info}", ""] + ([notes, ""] if notes else [])
    if config:
        lines += ["Config: " + ", ".join(f"{k} {v}" for k, v in config.items()), ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table)
    print(table)
    return table


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
