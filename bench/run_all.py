"""Run every benchmark (bench/bench_*.py) and print a short table last.

    python bench/run_all.py            # real shapes (long on a CPU)
    python bench/run_all.py --quick    # tiny shapes: checks that every benchmark runs
Each benchmark writes its own JSON + Markdown under bench/results; this script adds bench/results/run_all.json.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def discover():
    return sorted(p for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (each benchmark's --quick)")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run (e.g. bench_verify_tree)")
    ap.add_argument("--skip", nargs="*", default=[], help="benchmark names not to run")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    rows = []
    for path in discover():
        name = os.path.splitext(os.path.basename(path))[0]
        if (args.only and name not in args.only) or name in args.skip:
            continue
        cmd = [sys.executable, path] + (["--quick"] if args.quick else []) + ["--out-dir", args.out_dir]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
        rows.append({"benchmark": name, "ok": proc.returncode == 0, "seconds": round(seconds, 1),
                     "last_line": (proc.stdout.strip().splitlines() or [""])[-1][:100]})
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "run_all.json" if not args.quick else "run_all-quick.json"), "w") as f:
        json.dump({"quick": args.quick, "rows": rows}, f, indent=2)
    print("\n| benchmark | status | seconds | last line |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {r['last_line']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
