"""Greedy losslessness of speculative decoding on the evaluation prompts, recorded in bench/results.

For every first turn of mt_bench, humaneval and gsm8k (80 each), the default SmolLM2 target on the CPU (fp32, or
--dtype) and a randomly initialised draft (or --draft default): ``generate(temperature=0)`` with each tree shape must
give the tokens of ``generate(draft=None, temperature=0)``. On the row-invariant kernels (the CPU default) that
means bit for bit: any divergence fails; elsewhere one is tolerated at a numerical tie (vanilla's two best logits
within 1e-4 at the first differing token). The run reports every divergence and its gap.

    python bench/lossless_greedy.py                 # all 240 prompts, 64 new tokens, 4 tree shapes (hours on CPU)
    python bench/lossless_greedy.py --per-file 2    # a quick look
    python bench/lossless_greedy.py --dtype bfloat16 --draft default --trees 8-3-3,60-6-10 --per-file 27

Resumable: finished prompts (in bench/results/lossless_greedy.partial.tmp and the report) are skipped on a rerun;
--budget-s bounds one sitting. ``--shard K/N`` runs every N-th prompt from the K-th (N processes with one thread each
use two cores better than one with two); shards append to the same partial file, and a final run without
--shard (nothing left to do) writes the report of all of them.
Writes bench/results/lossless_greedy[_<dtype>].json and .md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hass_ext  # noqa: E402
from hass_ext.speed_eval import first_turns, machine_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
TIE = 1e-4
# --trees picks among these by key; the default set is the first five
TREE_CHOICES = {
    "60-6-10": ("60-node (EAGLE-2: 60 / 6 levels / top-k 10)", dict(total_tokens=60, depth=6, tree_topk=10)),
    "1": ("1-node", dict(total_tokens=1, tree_topk=1)),
    "8-3-4": ("8-node (depth 3, top-k 4)", dict(total_tokens=8, depth=3, tree_topk=4)),
    "chain": ("chain (top-k 1, 6 levels)", dict(total_tokens=7, depth=6, tree_topk=1)),
    "auto": ("auto (generate's default)", dict()),
    "8-3-3": ("8-node (depth 3, top-k 3)", dict(total_tokens=8, depth=3, tree_topk=3)),
}
DEFAULT_TREES = "60-6-10,1,8-3-4,chain,auto"
TREES = {}  # label -> options, set by main from --trees
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def divergence(target, prompt, vanilla, spec):
    """(index, top-2 logit gap of vanilla there) of the first differing token, or None."""
    i = next((j for j, (a, b) in enumerate(zip(vanilla, spec)) if a != b), None)
    if i is None:
        if len(vanilla) == len(spec):
            return None
        i = min(len(vanilla), len(spec))
    ids = target.encode(prompt)
    ids = torch.cat([ids, torch.tensor([vanilla[:i]], dtype=torch.long, device=ids.device)], 1)
    with torch.inference_mode():
        top2 = target.model(ids).logits[0, -1].float().topk(2).values
    return i, float(top2[0] - top2[1])


def run_prompt(target, draft, name, prompt, max_new_tokens):
    t = time.perf_counter()
    vanilla = hass_ext.generate(prompt, target=target, max_new_tokens=max_new_tokens)
    record = {"prompt": name, "vanilla_tokens": len(vanilla.token_ids), "vanilla_s": time.perf_counter() - t,
              "trees": {}}
    for label, tree in TREES.items():
        t = time.perf_counter()
        spec = hass_ext.generate(prompt, target=target, draft=draft, max_new_tokens=max_new_tokens, **tree)
        entry = {"identical": spec.token_ids == vanilla.token_ids, "seconds": time.perf_counter() - t,
                 "rounds": spec.num_rounds, "tau": spec.mean_accept_length, "tokens": spec.num_new_tokens}
        if not entry["identical"]:
            index, gap = divergence(target, prompt, vanilla.token_ids, spec.token_ids)
            entry.update(divergence_index=index, top2_gap=gap, tie=gap < TIE)
        record["trees"][label] = entry
    return record


def summarise(records, exact):
    out = {}
    for label in TREES:
        rows = [r["trees"][label] for r in records]
        div = [dict(prompt=r["prompt"], index=r["trees"][label]["divergence_index"],
                    top2_gap=r["trees"][label]["top2_gap"]) for r in records if not r["trees"][label]["identical"]]
        vanilla_s = sum(r["vanilla_s"] for r in records)
        out[label] = {
            "prompts": len(rows),
            "identical": sum(e["identical"] for e in rows),
            # on the row-invariant kernels no divergence is tolerated, not even at a tie
            "divergences_at_ties": [] if exact else [d for d in div if d["top2_gap"] < TIE],
            "divergences_without_tie": div if exact else [d for d in div if d["top2_gap"] >= TIE],
            "mean_tau": sum(e["tau"] for e in rows) / max(len(rows), 1),
            "time_vs_vanilla": sum(e["seconds"] for e in rows) / vanilla_s if vanilla_s else None,
        }
    return out


def markdown(summary, meta):
    lines = [f"# Greedy losslessness: speculative vs vanilla ({meta['date']})", "",
             (f"**Partial run: {meta['prompts']} of {meta['prompts_planned']} prompts so far** (rerun the command to "
              "continue). " if meta["prompts"] < meta["prompts_planned"] else "") +
             f"{meta['prompts']} prompts (first turns of mt_bench, humaneval, gsm8k), {meta['max_new_tokens']} new "
             f"tokens, target {meta['target']} {meta.get('dtype', 'float32')} on CPU, "
             + ("the shipped draft. " if meta.get("draft") == "default" else "randomly initialised draft (seed 0). ")
             + ("Bit-exact kernels (hass_tree attention, small_linear layers): no divergence is tolerated."
                if meta.get("exact") else
                f"A divergence is tolerated only where vanilla's two best logits are within {TIE:g}."), "",
             "| tree | prompts | token-identical | divergences at a tie | divergences without a tie | mean tau | "
             "time / vanilla |", "|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['prompts']} | {s['identical']} | {len(s['divergences_at_ties'])} | "
                     f"{len(s['divergences_without_tie'])} | {s['mean_tau']:.2f} | {s['time_vs_vanilla']:.2f} |")
    for label, s in summary.items():
        for d in s["divergences_at_ties"] + s["divergences_without_tie"]:
            lines.append(f"- {label}: {d['prompt']} differs at token {d['index']}, vanilla top-2 gap "
                         f"{d['top2_gap']:.3g}")
    m = meta["machine"]
    lines += ["", f"Records by commit: {meta['records_by_commit']}", f"Machine: {m}",
              f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def _commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def _parse_shard(ap, text):
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        ap.error(f"--shard must be K/N with integers, got {text!r}")
    if not 0 <= k < n:
        ap.error(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-file", type=int, default=None, help="prompts per file (default: all 80)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--eval-dir", default=None,
                    help="folder of mt_bench/humaneval/gsm8k.jsonl (default: the packaged question files)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new prompt after this many seconds; the report then covers the prompts done so far "
                         "(all runs together) and says it is partial")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="run only prompts K, K+N, K+2N, ... (0 <= K < N); no report is written")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--draft", default="random", choices=["random", "default"],
                    help="a randomly initialised draft (every round rejects: the most verify forwards per token) or "
                         "the shipped one (realistic acceptance)")
    ap.add_argument("--trees", default=DEFAULT_TREES, help=f"comma-separated keys of {sorted(TREE_CHOICES)}")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--name", default=None, help="report name (default lossless_greedy, + _<dtype> when not fp32)")
    args = ap.parse_args(argv)
    unknown = [k for k in args.trees.split(",") if k not in TREE_CHOICES]
    if unknown:
        ap.error(f"--trees: unknown {unknown}; choose from {sorted(TREE_CHOICES)}")
    TREES.clear()
    TREES.update(TREE_CHOICES[k] for k in args.trees.split(","))
    if args.name is None:
        args.name = "lossless_greedy" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    shard = _parse_shard(ap, args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    target = hass_ext.load_target(dtype=DTYPES[args.dtype], device="cpu")
    draft = hass_ext.init_draft(target, seed=0) if args.draft == "random" else "default"
    exact = target.model.config._attn_implementation == "hass_tree"
    partial = os.path.join(args.out_dir, f"{args.name}.partial.tmp")
    done = {}
    report = os.path.join(args.out_dir, f"{args.name}.json")
    def same_run(r):  # a record counts only for the same length, trees, dtype and draft
        return (r.get("max_new_tokens") == args.max_new_tokens and set(r.get("trees", {})) == set(TREES)
                and r.get("dtype", "float32") == args.dtype and r.get("draft", "random") == args.draft)

    if os.path.exists(report):  # a committed partial report continues too
        with open(report) as f:
            for r in json.load(f)["records"]:
                if same_run(r):
                    done[r["prompt"]] = r
    if os.path.exists(partial):
        with open(partial) as f:
            for line in f:
                r = json.loads(line)
                if same_run(r):
                    done[r["prompt"]] = r
    by_file = {}
    for name, prompt in first_turns(args.per_file, eval_dir=args.eval_dir):
        by_file.setdefault(name.split("[")[0], []).append((name, prompt))
    # interleaved across the files, so that a partial run covers all three alike
    todo = [item for group in zip(*by_file.values()) for item in group]
    if shard is not None:
        todo = todo[shard[0]::shard[1]]
    from tqdm import tqdm

    commit = _commit()
    records = []
    start = time.perf_counter()
    with open(partial, "a") as f:
        for name, prompt in tqdm(todo, desc="prompts"):
            if name not in done and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                continue
            if name not in done:
                r = run_prompt(target, draft, name, prompt, args.max_new_tokens)
                r["max_new_tokens"] = args.max_new_tokens
                r["dtype"], r["draft"] = args.dtype, args.draft
                r["commit"] = commit  # the code that produced this record (a run may span several commits)
                f.write(json.dumps(r) + "\n")
                f.flush()
                done[name] = r
            records.append(done[name])
    if shard is not None:
        print(f"shard {args.shard}: {len(records)} of {len(todo)} prompts done; run without --shard for the report")
        return 0
    summary = summarise(records, exact)
    by_commit = {}
    for r in records:
        by_commit[r.get("commit")] = by_commit.get(r.get("commit"), 0) + 1
    meta = {"commit": commit, "records_by_commit": by_commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "prompts": len(records),
            "prompts_planned": len(todo),
            "max_new_tokens": args.max_new_tokens, "target": target.name, "trees": TREES, "dtype": args.dtype,
            "draft": args.draft, "exact": exact,
            "machine": machine_info(),
            "command": "python bench/lossless_greedy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = {"meta": meta, "summary": summary, "records": records}
    with open(os.path.join(args.out_dir, f"{args.name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out_dir, f"{args.name}.md"), "w") as f:
        f.write(markdown(summary, meta))
    print(markdown(summary, meta))
    bad = sum(len(s["divergences_without_tie"]) for s in summary.values())
    if len(records) == len(todo) and os.path.exists(partial) and args.per_file is None:
        os.remove(partial)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
