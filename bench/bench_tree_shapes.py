"""What the automatic tree weighs on this device: for every shape of the shipped draft's acceptance profile, its tau
(from tree_profile.json), the cost of one round (draft tree + verification forward + the draft's context pass,
hass_ext.tree_choice.measure_costs: every shape and a vanilla step timed in turns after a 128-token context) and
the expected speedup tau x vanilla step / round. The costs are measured --passes times in one process (each pass
takes the medians of --repeats turns); the table holds the median over the passes.

    python bench/bench_tree_shapes.py                  # the default target and draft, float32, 2 passes
    python bench/bench_tree_shapes.py --dtype bfloat16
    python bench/bench_tree_shapes.py --quick          # a tiny target and a random draft (checks that it runs)

Writes bench/results/tree_shapes_<device>[-<dtype>].{json,md}.
"""
import os
import statistics
import sys

import torch

from common import parser, write

import hass_ext
from hass_ext import tree_choice
from hass_ext.draft_io import default_draft_path

# the random Llama targets of the tests, for --quick (tests/tiny_models.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tiny_models import tiny_target  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny():
    """A tiny random target and draft with a made-up profile (for --quick)."""
    target = tiny_target()
    draft = hass_ext.init_draft(target)
    draft.tree_profile = {"shapes": [{"total_tokens": n, "depth": d, "tree_topk": k, "tau": 1.0 + 0.1 * n}
                                     for n, d, k in ((2, 1, 1), (3, 1, 2), (4, 2, 2))]}
    return target, draft


def main():
    ap = parser(__doc__)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="timed turns per pass (medians)")
    args = ap.parse_args()
    if args.quick:
        target, draft = tiny()
    else:
        target = hass_ext.load_target(dtype=DTYPES[args.dtype], device=args.device)
        draft = hass_ext.load_draft(default_draft_path(target), target=target)
    taus = tree_choice._profile_shapes(draft.tree_profile)
    passes = [tree_choice.measure_costs(target, draft, list(taus), taus, repeats=2 if args.quick else args.repeats)
              for _ in range(1 if args.quick else args.passes)]
    vanilla = statistics.median(v for _, v in passes)
    rows = []
    for shape in sorted(taus, key=lambda s: (s[0], s[1])):
        cost = statistics.median(c[shape] for c, _ in passes)
        rows.append({"tree": "/".join(map(str, shape)), "tau": taus[shape], "round_ms": cost * 1e3,
                     "round / vanilla step": cost / vanilla, "expected_speedup": taus[shape] * vanilla / cost})
    best = max(rows, key=lambda r: r["expected_speedup"])
    note = (f"Vanilla step {vanilla * 1e3:.2f} ms; {len(passes)} pass(es) of {args.repeats} turns, "
            f"{torch.get_num_threads()} thread(s), {args.dtype}. Best: {best['tree']} "
            f"(expected {best['expected_speedup']:.2f}x). tau: the draft's tree_profile.json.")
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    write(f"tree_shapes_{torch.device(args.device).type}{suffix}", rows, args.out_dir, note, args.quick)


if __name__ == "__main__":
    main()
