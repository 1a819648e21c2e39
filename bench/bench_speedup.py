"""End to end: vanilla decoding vs speculative decoding with the shipped HASS draft, per evaluation dataset.

    python bench/bench_speedup.py                   # 20 first turns per file, greedy, 128 new tokens, auto tree
    python bench/bench_speedup.py --per-file 80     # all 240 prompts
    python bench/bench_speedup.py --quick           # a tiny run (checks that it works)

Both methods decode every prompt side by side in one process, interleaved per prompt (hass_ext.speed_eval), with
the default tree choice (``total_tokens="auto"``: from the draft's acceptance profile and the round costs measured
here); the greedy outputs are compared token for token with vanilla's. Writes bench/results/speedup_<device>.json
and .md (``--quick``: speedup_<device>-quick.*): tau, tokens/s, speedup, identical outputs, the tree used.
"""
import argparse
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hass_ext  # noqa: E402
from hass_ext.speed_eval import DATASETS, evaluate, markdown_table, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-file", type=int, default=20, help="first turns per question file (default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft", default="default", help="the draft (default: the one shipped for the target)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="1 prompt per file, 8 tokens")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.per_file, args.max_new_tokens = 1, 8
    target = hass_ext.load_target(dtype=getattr(torch, args.dtype))
    draft = args.draft if args.draft == "default" else hass_ext.load_draft(args.draft, target=target)
    results = evaluate(target, {"hass": draft}, datasets=DATASETS, temperatures=[0.0],
                       num_questions=args.per_file, max_new_tokens=args.max_new_tokens, turns=1,
                       progress=not args.quick)
    device = "cuda" if target.device.type == "cuda" else "cpu"
    name = f"speedup_{device}" + ("-quick" if args.quick else "")
    settings = dict(per_file=args.per_file, max_new_tokens=args.max_new_tokens, draft=args.draft,
                    dtype=args.dtype, threads=torch.get_num_threads(), temperature=0.0, turns=1,
                    target=target.name)
    command = "python bench/bench_speedup.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_results(results, args.out_dir, name, command, settings)
    table = markdown_table(results)
    total_v = sum(e["methods"]["vanilla"]["seconds"] for e in results.values())
    total_h = sum(e["methods"]["hass"]["seconds"] for e in results.values())
    same = sum(e["methods"]["hass"].get("identical_to_vanilla", 0) for e in results.values())
    n = sum(e["methods"]["hass"]["questions"] for e in results.values())
    print(table)
    print(f"all {n} prompts: vanilla {total_v:.1f} s, speculative {total_h:.1f} s: {total_v / total_h:.2f}x; "
          f"{same}/{n} outputs identical to vanilla")
    return 0


if __name__ == "__main__":
    sys.exit(main())
