"""Where the time of one speculative round goes on this device: the decode loop of hass_ext.speculative, run
step by step with a timer around each part.

    draft_tree   EAGLE-2 tree expansion (draft forwards, heads, top-k, selection, tree mask)
    verify       the target forward over the tree (+ its lm_head), with the mask and position ids it needs
    accept       hass_ext.ops.verify_tree and reading its result
    compact      moving the accepted target K/V into place
    extend       the draft context pass over the accepted tokens
    rest         everything else in the loop (Python, tensor bookkeeping)

Default target (SmolLM2-135M-Instruct, fp32 on the CPU) with a random draft (init_draft, weights std 0.05 so that
the trees go 6 levels deep as a trained draft's do) or --draft DIR; a random draft accepts ~nothing, so every round
is one full-size tree. Prompts: the first turns of the packaged MT-bench,
HumanEval and GSM8K questions. Writes bench/results/round_parts_<device>.{json,md} (--name to change).
"""
import json
import os

import torch

from common import parser, write

import hass_ext
from hass_ext import speculative as spec
from hass_ext.timing import PhaseTimer

PARTS = ("draft_tree", "verify", "accept", "compact", "extend", "rest")


def prompts(n: int):
    data = os.path.join(os.path.dirname(hass_ext.__file__), "data", "eval")
    out = []
    for name in ("mt_bench", "humaneval", "gsm8k"):
        with open(os.path.join(data, f"{name}.jsonl")) as f:
            out.append(json.loads(next(line for line in f if line.strip()))["turns"][0])
    return out[:n]


def timed_rounds(target, draft, input_ids, rounds, total_tokens, depth, tree_topk):
    """Run the loop of speculative_decode for ``rounds`` rounds (greedy); return seconds per part."""
    t = dict.fromkeys(PARTS, 0.0)
    sampling = spec.Sampling(0.0, 1.0, 0, None)
    state = spec.initial_state(target, draft, input_ids, sampling)
    for _ in range(rounds):
        timer = PhaseTimer(target.device)
        with timer("round"):
            spec.speculative_round(target, draft, state, sampling, total_tokens, depth, tree_topk, phase=timer)
        parts = timer.seconds()
        for name, seconds in parts.items():
            if name != "round":
                t["draft_tree" if name == "draft" else name] += seconds
        t["rest"] += parts["round"] - sum(v for k, v in parts.items() if k != "round")
    return t


def main():
    ap = parser(__doc__)
    ap.add_argument("--draft", default=None, help="draft checkpoint folder (default: a random draft)")
    ap.add_argument("--init-range", type=float, default=0.05,
                    help="std of the random draft's weights (0.05: peaked like a trained draft, so trees go 6 "
                         "levels deep; init_draft's 0.02 gives near-uniform drafts whose trees stop at depth 2)")
    ap.add_argument("--token-map", default=None, help="a token_map.pt to give the draft a hot vocabulary")
    ap.add_argument("--rounds", type=int, default=24, help="rounds per prompt")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tree", type=int, nargs=3, default=[60, 6, 10], metavar=("TOTAL", "DEPTH", "TOPK"),
                    help="tree shape (default: the EAGLE-2 tree 60 6 10)")
    ap.add_argument("--name", default=None, help="result file name (default round_parts_<device>)")
    args = ap.parse_args()
    dev = args.device
    target = hass_ext.load_target(dtype=torch.float32 if dev == "cpu" else torch.bfloat16, device=dev)
    draft = (hass_ext.load_draft(args.draft, target=target) if args.draft
             else hass_ext.init_draft(target, initializer_range=args.init_range))
    if args.token_map:
        from hass_ext.draft_io import load_token_map

        draft.set_token_map(load_token_map(args.token_map, draft.config.vocab_size))
    rounds = 3 if args.quick else args.rounds
    ps = prompts(1 if args.quick else args.prompts)
    totals = dict.fromkeys(PARTS, 0.0)
    n_rounds = 0
    with torch.inference_mode():
        timed_rounds(target, draft, target.encode(ps[0]), 2, *args.tree)  # warm-up
        for p in ps:
            t = timed_rounds(target, draft, target.encode(p), rounds, *args.tree)
            for k in PARTS:
                totals[k] += t[k]
            n_rounds += rounds
    round_ms = sum(totals.values()) / n_rounds * 1e3
    rows = [{"part": k, "ms_per_round": totals[k] / n_rounds * 1e3, "share": totals[k] / sum(totals.values())}
            for k in PARTS]
    rows.append({"part": "round", "ms_per_round": round_ms, "share": 1.0})
    n, d, k = args.tree
    note = (f"{len(ps)} prompt(s) x {rounds} rounds, tree {n} nodes, depth {d}, top-k {k}, greedy, "
            f"{'random draft (std %g)' % args.init_range if not args.draft else 'draft ' + os.path.basename(args.draft)}"
            f"{', hot vocabulary of %d' % draft.tree_vocab_size if draft.hot_token_ids is not None else ''}, "
            f"{torch.get_num_threads()} thread(s).")
    write(args.name or f"round_parts_{dev}", rows, args.out_dir, note, args.quick)


if __name__ == "__main__":
    main()
