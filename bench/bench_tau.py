"""Acceptance length tau of the shipped drafts (HASS default, EAGLE baseline) on the evaluation prompts, greedy.

    python bench/bench_tau.py                  # 20 first turns per file, 128 new tokens
    python bench/bench_tau.py --per-file 80    # all 240 prompts
    python bench/bench_tau.py --quick          # a tiny run (checks that it works)
    python bench/bench_tau.py --per-file 10 --draft ref=RUNS/hass/draft --name draft_tau_variants
                                               # ... and further drafts (training variants) beside them

tau is measured by replaying greedy speculative decoding (hass_ext.tree_choice.replay_rounds): the target's
greedy continuation of each prompt is computed once, then every draft builds its real trees from its real cache
round by round and the accepted length is read off against that continuation; this gives the accept lengths
greedy decoding gets (tests/test_tree_choice.py checks it round for round against generate()), without a target
verification forward per round and per draft. Shapes: the EAGLE-2 tree (60 nodes, depth 6, top-k 10) and the
shape ``total_tokens="auto"`` picks for the HASS draft on this machine. Both definitions of tau are reported:
token-weighted (all new tokens / all rounds) and the reference's (per-prompt mean accept length + 1, averaged).
Writes bench/results/draft_tau.json and .md (``--name``: that name instead; ``--quick``: *-quick.*).
"""
import argparse
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hass_ext  # noqa: E402
from hass_ext import tree_choice  # noqa: E402
from hass_ext.speed_eval import DATASETS, first_turns, machine_info  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EAGLE_2_TREE = (60, 6, 10)


def drafts_for(target):
    from hass_ext.draft_io import default_draft_path

    name = os.path.basename(str(target.name).rstrip("/"))
    out = {"hass": default_draft_path(target)}
    eagle = os.path.join(HERE, "drafts", f"eagle-{name}")
    if os.path.isfile(os.path.join(eagle, "config.json")):
        out["eagle"] = eagle
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-file", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="1 prompt per file, 8 tokens")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                    help="a further draft (EAGLE-layout folder) measured beside the shipped ones; repeatable")
    ap.add_argument("--name", default="draft_tau", help="file name of the results (without extension)")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_file, args.max_new_tokens = 1, 8
    target = hass_ext.load_target(dtype=torch.float32, device="cpu")
    paths = drafts_for(target)
    for spec in args.draft:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in paths:
            ap.error(f"--draft takes NAME=DIR with a new NAME, got {spec!r}")
        paths[name] = path
    drafts = {k: hass_ext.load_draft(v, target=target) for k, v in paths.items()}
    chosen = tree_choice.choose_tree(target, drafts["hass"])
    shapes = {"EAGLE-2 tree (60/6/10)": EAGLE_2_TREE,
              f"auto for hass ({chosen.total_tokens}/{chosen.depth}/{chosen.tree_topk})":
                  (chosen.total_tokens, chosen.depth, chosen.tree_topk)}
    rows = []
    for dataset in DATASETS:
        prompts = first_turns(per_file=args.per_file, datasets=[dataset])
        conts = tree_choice.continuations(target, [p for _, p in prompts], args.max_new_tokens,
                                          progress=not args.quick)
        for label, shape in shapes.items():
            for name, draft in drafts.items():
                accepts, tau = tree_choice.replay_tau(draft, conts, shape)
                per_prompt = [sum(a) / len(a) + 1 for a in accepts if a]
                rows.append({"dataset": dataset, "tree": label, "draft": name, "prompts": len(conts),
                             "rounds": sum(len(a) for a in accepts), "tau": tau,
                             "tau_reference": sum(per_prompt) / len(per_prompt) if per_prompt else 1.0})
                print(json.dumps(rows[-1]), flush=True)
    name = args.name + ("-quick" if args.quick else "")
    versus = [d for d in drafts if d != "eagle"] if "eagle" in drafts else []  # each draft's tau / EAGLE's
    os.makedirs(args.out_dir, exist_ok=True)
    doc = {"benchmark": args.name, "machine": machine_info("cpu"),
           "command": "python bench/bench_tau.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "settings": {"per_file": args.per_file, "max_new_tokens": args.max_new_tokens, "greedy": True,
                        "drafts": {k: os.path.relpath(v, ROOT) for k, v in paths.items()},
                        "auto_choice": chosen.to_dict()},
           "measurements": rows}
    with open(os.path.join(args.out_dir, name + ".json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Draft acceptance length tau ({doc['machine']['date'][:10]})", "",
             f"Greedy, first turns ({args.per_file} per file), {args.max_new_tokens} new tokens, target "
             f"{target.name} fp32. tau = new tokens per target verification (token-weighted; in brackets the "
             "reference's per-prompt mean), from replayed greedy decoding (see bench/bench_tau.py). Each draft "
             "uses its own reduced vocabulary.", "",
             "| dataset | tree | " + " | ".join(list(drafts) + [f"{d} / eagle" for d in versus]) + " |",
             "|---|---|" + "---|" * (len(drafts) + len(versus))]
    for dataset in DATASETS + ("all",):
        for label in shapes:
            sel = [r for r in rows if r["tree"] == label and (dataset == "all" or r["dataset"] == dataset)]
            taus = {}
            for d in drafts:
                rs = [r for r in sel if r["draft"] == d]
                rounds = sum(r["rounds"] for r in rs)
                taus[d] = sum(r["tau"] * r["rounds"] for r in rs) / rounds
                ref = sum(r["tau_reference"] * r["prompts"] for r in rs) / sum(r["prompts"] for r in rs)
                taus[d] = (taus[d], ref)
            cells = [f"{t:.3f} ({ref:.3f})" for t, ref in taus.values()]
            ratio = [f"{taus[d][0] / taus['eagle'][0]:.3f}" for d in versus]
            lines.append(f"| {dataset} | {label} | " + " | ".join(cells + ratio) + " |")
    with open(os.path.join(args.out_dir, name + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
