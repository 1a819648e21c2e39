"""Ship the drafts trained by train_drafts.py: bf16 safetensors without the embedding (the target's, copied back on
load), in the EAGLE layout, with a reduced draft vocabulary and an acceptance profile.

    python python/export_drafts.py --runs RUNS --data DATA     # RUNS/hass/draft -> hass_ext/drafts/<target>
                                                               # RUNS/eagle/draft -> bench/drafts/eagle-<target>
    python python/export_drafts.py --runs RUNS --data DATA --mode eagle
    python python/export_drafts.py --runs RUNS2 --data DATA2 --stage 2   # after train_drafts.py --stage 2

For each draft: the hot vocabulary (FR-Spec style, ``token_map.pt``) it was trained for (``draft_vocab``), or
else one of each candidate size built from the assistant tokens of DATA; the acceptance of the candidate tree
shapes is replayed on held-out ShareGPT prompts (hass_ext.tree_choice: records after the training selection,
never the evaluation questions), the round costs are measured on this machine, and the vocabulary with the
highest expected speedup is kept together with its ``tree_profile.json``. The table of every candidate goes to bench/results/draft_export.{json,md}. Both drafts get
the HASS draft's vocabulary size, so they are compared like for like.

The HASS draft becomes ``draft="default"`` for the target; the EAGLE draft is kept beside the benchmarks.
"""
import argparse
import json
import os
import sys

import torch

import hass_ext
from hass_ext import tree_choice
from hass_ext.speed_eval import machine_info
from hass_ext.train.conversations import first_user_turns
from hass_ext.train.token_map import hot_vocabulary, template_token_ids, token_frequencies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (4096, 8192, 16384)
# the shapes profiled for the shipped drafts: those `hass-ext tree-profile` measures by default
SHAPES = tree_choice.DEFAULT_SHAPES


def destination(mode: str, target_name: str) -> str:
    name = os.path.basename(str(target_name).rstrip("/"))
    if mode == "hass":
        return os.path.join(ROOT, "hass_ext", "drafts", name)
    return os.path.join(ROOT, "bench", "drafts", f"{mode}-{name}")


def calibration_prompts(data_dir: str, count: int, start=None) -> list:
    """First user turns of ShareGPT records from ``start`` on (default: after the ones the data folder was
    prepared from)."""
    if start is None:
        with open(os.path.join(data_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest["source"]["name"] != "sharegpt" or manifest["selection"]["num_conversations"] is None:
            raise ValueError(f"{data_dir} was not prepared from a range of ShareGPT records: pass --calibration-start")
        start = manifest["source"].get("start", 0) + manifest["selection"]["num_conversations"]
    return first_user_turns("sharegpt", start, count)


def export(run_dir: str, mode: str, target, counts, conts, sizes, max_new_tokens: int) -> dict:
    src = os.path.join(run_dir, "draft")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src} holds no finished draft: run python/train_drafts.py to the end first")
    out = destination(mode, target.name)
    # the shipped weights (bf16, no embedding) are what gets measured
    hass_ext.save_draft(hass_ext.load_draft(src, target=target), out, dtype=torch.bfloat16, embedding=False)
    draft = hass_ext.load_draft(out, target=target)
    always = template_token_ids(target)
    trained = draft.hot_token_ids  # a draft trained with draft_vocab keeps the vocabulary it was trained for
    maps = {int(trained.numel()): trained} if trained is not None else {
        n: None if n is None else hot_vocabulary(counts, n, always) for n in sizes}
    rows, best = [], None
    for n, ids in maps.items():
        draft.set_token_map(ids)
        profile = tree_choice.measure_acceptance(target, draft, None, SHAPES, max_new_tokens=max_new_tokens,
                                                 conts=conts)
        taus = {(s["total_tokens"], s["depth"], s["tree_topk"]): s["tau"] for s in profile["shapes"]}
        costs, vanilla = tree_choice.measure_costs(target, draft, list(taus), taus)
        for shape, tau in taus.items():
            rows.append({"mode": mode, "draft_vocab": n or target.config.vocab_size, "total_tokens": shape[0],
                         "depth": shape[1], "tree_topk": shape[2], "tau": tau, "round_ms": costs[shape] * 1e3,
                         "vanilla_step_ms": vanilla * 1e3, "expected_speedup": tau * vanilla / costs[shape]})
        top = max(rows[-len(taus):], key=lambda r: r["expected_speedup"])
        print(json.dumps({"mode": mode, "draft_vocab": top["draft_vocab"], "best": top}), flush=True)
        if best is None or top["expected_speedup"] > best[0]["expected_speedup"]:
            best = (top, n, profile)
    top, n, profile = best
    draft.set_token_map(maps[n])
    draft.tree_profile = profile
    hass_ext.save_draft(draft, out, dtype=torch.bfloat16, embedding=False)
    print(json.dumps({"mode": mode, "from": src, "to": os.path.relpath(out, ROOT), "chosen": top}), flush=True)
    return {"mode": mode, "to": os.path.relpath(out, ROOT), "chosen": top, "rows": rows}


def training_summary(run_dir: str, mode: str) -> dict:
    """Steps, wall time and the held-out k-step acceptance of a finished run (its log.jsonl)."""
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    final = {**evals[-1], **heldout_eval(run_dir)}
    seconds, last = 0.0, 0.0  # "elapsed" restarts from 0 when a run is resumed: add up the sittings
    for r in train:
        if r.get("elapsed", 0.0) < last:
            seconds += last
        last = r.get("elapsed", 0.0)
    seconds += last
    return {"mode": mode, "steps": final["step"], "train_seconds": seconds or None,
            "final_loss_avg": train[-1].get("loss_avg") if train else None, "heldout_acc": final["acc"],
            "heldout_accepted_per_chain": final["accepted_per_chain"], "heldout_chains": final["chains"],
            "heldout_loss_per_step": final["loss_per_step"],
            "evals": [{"step": r["step"], "acc": r["acc"]} for r in evals]}


def heldout_eval(run_dir: str) -> dict:
    """The final checkpoint's held-out k-step acceptance, recomputed with this version of the trainer."""
    from hass_ext.train.trainer import STATE_FILE, Trainer, config_from_dict

    with open(os.path.join(run_dir, "checkpoints", "latest.json"), encoding="utf-8") as f:
        path = os.path.join(run_dir, "checkpoints", json.load(f)["checkpoint"])
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    cfg = config_from_dict({**state["config"], "progress": False})
    trainer = Trainer(cfg)
    trainer.load_checkpoint(path)
    return trainer.evaluate()


STAGE_NOTES = {
    1: ("python python/prepare_sharegpt.py; python python/train_drafts.py", ""),
    2: ("python python/prepare_sharegpt.py --part 2; python python/train_drafts.py --stage 2",
        " Stage 2: each stage-1 draft (1,116 steps on ShareGPT records 0-2699) continued for one pass over records "
        "2700-5399 (lr 2e-4); the steps and time below are stage 2's, held-out data from the stage-2 folder."),
    3: ("python python/regenerate_sharegpt.py; python python/prepare_sharegpt.py --part 3; "
        "python python/train_drafts.py --stage 3",
        " Stage 3 (self-distillation): each stage-2 draft continued for two passes over the target's own greedy "
        "answers to the first user turns of ShareGPT records 5400-7399 (lr 2e-4); the steps and time below are "
        "stage 3's, held-out data = held-out answers of the stage-3 folder (the target's text, so not comparable "
        "with the numbers of stages 1-2)."),
    4: ("python python/regenerate_sharegpt.py --stage 4; python python/prepare_sharegpt.py --part 4; "
        "python python/train_drafts.py --stage 4",
        " Stage 4 (self-distillation, continued): each stage-3 draft (stages 1-3: ShareGPT records 0-5399, then the "
        "target's answers to records 5400-7399) continued for two passes over the target's own greedy answers to "
        "the first user turns of ShareGPT records 7400-9399 (lr 2e-4); the steps and time below are stage 4's, "
        "held-out data = held-out answers of the stage-4 folder."),
}


def write_training(summaries: list, stage: int = 1) -> None:
    path = os.path.join(ROOT, "bench", "results", "draft_training")
    recipe, note = STAGE_NOTES[stage]
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump({"benchmark": "draft_training", "machine": machine_info("cpu"), "recipe": recipe, "stage": stage,
                   "summaries": summaries}, f, indent=1)
    lines = ["Training of the shipped drafts (python/prepare_sharegpt.py + python/train_drafts.py: same data, seed and "
             "optimizer steps). Held-out k-step acceptance: share of greedy chains whose first i+1 draft tokens all "
             "match the target's (teacher-forced on held-out ShareGPT conversations)." + note, "",
             "| draft | steps | train time (s) | acc@1 | acc@2 | acc@3 | acc@4 | acc@5 | accepted per 5-chain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        acc = " | ".join(f"{a:.3f}" for a in s["heldout_acc"])
        t = f"{s['train_seconds']:.0f}" if s["train_seconds"] else "-"
        lines.append(f"| {s['mode']} | {s['steps']} | {t} | {acc} | {s['heldout_accepted_per_chain']:.3f} |")
    with open(path + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_table(results: list, args) -> None:
    info = machine_info()
    path = os.path.join(ROOT, "bench", "results", "draft_export")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump({"machine": info, "command": "python python/export_drafts.py " + " ".join(sys.argv[1:]),
                   "calibration_prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                   "results": results}, f, indent=1)
    lines = [f"Draft export: hot-vocabulary size and tree shape per draft, {info.get('date', '')}; "
             f"{info.get('cpu', '')}, {torch.get_num_threads()} torch threads. tau: greedy speculative decoding "
             f"replayed on {args.prompts} held-out ShareGPT prompts x {args.max_new_tokens} tokens "
             "(hass_ext.tree_choice); round and vanilla-step times measured on this CPU (compare ratios).", "",
             "| draft | draft vocab | nodes | depth | top-k | tau | round ms | vanilla step ms | expected speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            mark = " **(chosen)**" if r == res["chosen"] else ""
            lines.append(f"| {r['mode']} | {r['draft_vocab']} | {r['total_tokens']} | {r['depth']} | "
                         f"{r['tree_topk']} | {r['tau']:.3f} | {r['round_ms']:.1f} | {r['vanilla_step_ms']:.1f} | "
                         f"{r['expected_speedup']:.2f}{mark} |")
    with open(path + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="the --out folder of train_drafts.py")
    ap.add_argument("--data", required=True, help="the prepared data folder (token counts, held-out prompts)")
    ap.add_argument("--mode", choices=["both", "hass", "eagle"], default="both")
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES),
                    help="hot-vocabulary sizes to try (0: the full vocabulary)")
    ap.add_argument("--prompts", type=int, default=12, help="held-out calibration prompts")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--stage", type=int, choices=sorted(STAGE_NOTES), default=1,
                    help="the train_drafts.py --stage of RUNS")
    ap.add_argument("--calibration-start", type=int, default=None,
                    help="first ShareGPT record of the calibration prompts (default: after the data folder's "
                         "records; stages 3, 4: after the regenerated ones)")
    args = ap.parse_args(argv)
    target = hass_ext.load_target(dtype=torch.float32, device="cpu")
    counts = token_frequencies(args.data, target.config.vocab_size)
    start = args.calibration_start
    if start is None and args.stage >= 3:
        from regenerate_sharegpt import STAGES as REGEN  # python/ is on sys.path when run as a script

        start = REGEN[args.stage]["start"] + REGEN[args.stage]["num_conversations"]
    conts = tree_choice.continuations(target, calibration_prompts(args.data, args.prompts, start),
                                      args.max_new_tokens)
    sizes = [s or None for s in args.sizes]
    results = []
    for mode in (["hass", "eagle"] if args.mode == "both" else [args.mode]):
        res = export(os.path.join(args.runs, mode), mode, target, counts, conts, sizes, args.max_new_tokens)
        results.append(res)
        if mode == "hass":  # the EAGLE draft gets the same vocabulary size
            chosen = res["chosen"]["draft_vocab"]
            sizes = [None if chosen == target.config.vocab_size else chosen]
    write_table(results, args)
    write_training([training_summary(os.path.join(args.runs, r["mode"]), r["mode"]) for r in results], args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
