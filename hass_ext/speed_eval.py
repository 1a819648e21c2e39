"""Speed evaluation on MT-bench, HumanEval and GSM8K the way the HASS/EAGLE papers report it: acceptance length
tau and speedup over vanilla decoding (``hass-ext eval``, python/run_speed_eval.py).

Every method (vanilla and each draft) runs on the same questions in one process, interleaved per prompt (the
order rotates from one question to the next so slow drifts of a shared machine cancel out). Reported per
dataset and temperature:
- tau (as the upstream evaluation scripts define it): per question mean(accept_length) + 1 over its rounds, then
  the unweighted mean over questions; tau (token-weighted): all new tokens / all verification rounds;
- tokens/s per method (new tokens over wall time, prefill included) and speedup = mean over questions of the
  method's speed / mean of vanilla's speed (the upstream speed.py), plus the ratio of total throughputs.
Multi-turn questions keep the model's own earlier answers in the conversation, as the reference does.
"""
import json
import os
import platform
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from .atomic_io import atomic_write_text
from .generate import generate

DATASETS = ("mt_bench", "humaneval", "gsm8k")
_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval")


def load_questions(name_or_path: str, limit: Optional[int] = None) -> List[dict]:
    """Questions ``{question_id, category, turns: [...]}`` of a packaged dataset name or a JSONL file."""
    path = name_or_path if os.path.exists(name_or_path) else os.path.join(_DATA_DIR, f"{name_or_path}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no question file {name_or_path!r}: give one of {', '.join(DATASETS)} or a path "
                                "to a JSONL file of {\"question_id\", \"turns\": [...]} objects")
    questions = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(q.get("turns"), list) or not q["turns"]:
                raise ValueError(f"{path}:{lineno}: a question needs a non-empty 'turns' list")
            questions.append(q)
    return questions[:limit] if limit else questions


def first_turns(per_file: Optional[int] = None, datasets: Sequence[str] = DATASETS, eval_dir=None) -> List[tuple]:
    """``(name[i], first turn)`` of each question of ``datasets`` (packaged names, or files in ``eval_dir``);
    ``per_file`` questions evenly spaced over each file when given."""
    out = []
    for name in datasets:
        rows = [q["turns"][0] for q in load_questions(os.path.join(eval_dir, f"{name}.jsonl") if eval_dir else name)]
        keep = [int(i * len(rows) / per_file) for i in range(per_file)] if per_file else range(len(rows))
        out += [(f"{name}[{i}]", rows[i]) for i in keep]  # named by the question's index in its file
    return out


def _dataset_name(name_or_path: str) -> str:
    return os.path.splitext(os.path.basename(name_or_path))[0]


def _run_question(target, draft, question, turns, **kw) -> dict:
    """All turns of one question with one method; returns tokens, seconds and accept lengths."""
    messages, tokens, seconds, accepts, tree, ids = [], 0, 0.0, [], None, []
    for turn in question["turns"][:turns]:
        messages.append({"role": "user", "content": turn})
        res = generate(list(messages), target=target, draft=draft, **kw)
        messages.append({"role": "assistant", "content": res.text})
        tokens += res.num_new_tokens
        seconds += res.elapsed
        accepts += list(res.accept_lengths)
        tree = res.tree.to_dict() if res.tree is not None else None
        ids.append(list(res.token_ids))
    return {"tokens": tokens, "seconds": seconds, "accept_lengths": accepts, "tree": tree, "token_ids": ids}


def summarize(per_question: Dict[str, List[dict]], greedy: bool = False) -> Dict[str, dict]:
    """Per-method statistics from the per-question records of one dataset and temperature (``greedy``: T = 0,
    where every method must reproduce vanilla's tokens: ``identical_to_vanilla`` counts the questions that do)."""
    base = per_question.get("vanilla")
    base_speed = (sum(r["tokens"] / r["seconds"] for r in base) / len(base)) if base else None
    base_total = (sum(r["tokens"] for r in base) / sum(r["seconds"] for r in base)) if base else None
    out = {}
    for method, rows in per_question.items():
        speed = sum(r["tokens"] / r["seconds"] for r in rows) / len(rows)
        total = sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        stats = {"questions": len(rows), "new_tokens": sum(r["tokens"] for r in rows),
                 "seconds": sum(r["seconds"] for r in rows), "tokens_per_second": speed,
                 "throughput": total}
        trees = [r.get("tree") for r in rows if r.get("tree")]
        if trees:
            stats["tree"] = trees[0]
        rounds = [r["accept_lengths"] for r in rows if r["accept_lengths"]]
        if rounds:
            stats["tau"] = sum(sum(a) / len(a) + 1 for a in rounds) / len(rounds)
            all_rounds = [a for r in rounds for a in r]
            stats["tau_token_weighted"] = sum(a + 1 for a in all_rounds) / len(all_rounds)
            hist: Dict[int, int] = {}
            for a in all_rounds:
                hist[a] = hist.get(a, 0) + 1
            stats["accept_histogram"] = {str(k): hist[k] for k in sorted(hist)}
        if base_speed:
            stats["speedup"] = speed / base_speed
            stats["throughput_speedup"] = total / base_total
            if greedy and method != "vanilla" and all("token_ids" in r for r in rows + base):
                # greedy runs must reproduce vanilla's tokens (a numerical tie aside: see bench/lossless_greedy.py)
                same = [r["token_ids"] == b["token_ids"] for r, b in zip(rows, base)]
                stats["identical_to_vanilla"] = sum(same)
        out[method] = stats
    return out


def evaluate(target, drafts: Dict[str, object], datasets: Sequence[str] = DATASETS,
             temperatures: Sequence[float] = (0.0, 1.0), num_questions: Optional[int] = None,
             max_new_tokens: int = 512, turns: int = 2, warmup: int = 1, seed: int = 0, progress: bool = True,
             **tree_options) -> dict:
    """Run vanilla decoding and every draft over the datasets; returns the results dict (see module docstring)."""
    methods = {"vanilla": None, **drafts}
    loaded = {_dataset_name(d): load_questions(d, num_questions) for d in datasets}
    first = next(iter(loaded.values()))[0]
    for _ in range(warmup):  # first calls pay one-off costs (allocations, lazy init, auto tree sizing)
        for name, draft in methods.items():
            generate(first["turns"][0], target=target, draft=draft, max_new_tokens=16,
                     **(tree_options if draft is not None else {}))
    results = {}
    total = sum(len(q) for q in loaded.values()) * len(temperatures)
    bar = tqdm(total=total, desc="eval", unit="question", disable=not progress)
    for T in temperatures:
        for dname, questions in loaded.items():
            per_q: Dict[str, List[dict]] = {m: [] for m in methods}
            for qi, q in enumerate(questions):
                order = list(methods)
                order = order[qi % len(order):] + order[:qi % len(order)]  # rotate: interleaved, fair
                for m in order:
                    kw = dict(max_new_tokens=max_new_tokens, temperature=T, seed=seed + qi)
                    if methods[m] is not None:
                        kw.update(tree_options)
                    per_q[m].append(_run_question(target, methods[m], q, turns, **kw))
                bar.update(1)
            results[f"{dname}@T={T:g}"] = {"dataset": dname, "temperature": T, "methods": summarize(per_q, greedy=T == 0)}
    bar.close()
    return results


def machine_info(device=None) -> dict:
    """Where a measurement was taken: CPU model and cores, torch threads and version, the GPU when it ran on one
    (``device``: "cuda"/"cpu"; default: the GPU when one is visible), date (UTC)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu"}
    if on_gpu:
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def markdown_table(results: dict) -> str:
    lines = ["| dataset | T | method | tree (nodes/depth/top-k) | tau | tau (token-weighted) | tokens/s | speedup | "
             "identical to vanilla |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in results.values():
        for m, s in entry["methods"].items():
            tau = f"{s['tau']:.2f}" if "tau" in s else "-"
            tauw = f"{s['tau_token_weighted']:.2f}" if "tau_token_weighted" in s else "-"
            sp = f"{s['speedup']:.2f}x" if "speedup" in s else "-"
            t = s.get("tree")
            tree = f"{t['total_tokens']}/{t['depth']}/{t['tree_topk']}" if t else "-"
            same = f"{s['identical_to_vanilla']}/{s['questions']}" if "identical_to_vanilla" in s else "-"
            lines.append(f"| {entry['dataset']} | {entry['temperature']:g} | {m} | {tree} | {tau} | {tauw} | "
                         f"{s['tokens_per_second']:.1f} | {sp} | {same} |")
    return "\n".join(lines)


def write_results(results: dict, out_dir: str, name: str, command: str, settings: dict) -> Dict[str, str]:
    """JSON + Markdown (+ PNG plots when matplotlib is present) under out_dir; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{name}-{stamp}")
    doc = {"command": command, "settings": settings, "machine": machine_info(), "results": results}
    paths = {"json": base + ".json", "md": base + ".md"}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2))
    md = (f"# {name}\n\nCommand: `{command}`\n\nMachine: {doc['machine']}\n\nSettings: {settings}\n\n"
          + markdown_table(results) + "\n")
    atomic_write_text(paths["md"], md)
    paths.update(_plots(results, base))
    return paths


def _plots(results: dict, base: str) -> Dict[str, str]:
    try:
        import matplotlib  # start-up: optional, and slow to import; only plots need it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # start-up: as above
    except ImportError:
        return {}
    out = {}
    keys = list(results)
    methods = [m for m in next(iter(results.values()))["methods"] if m != "vanilla"]
    if methods:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(keys)), 3.2))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar([k + i * width for k in range(len(keys))],
                   [results[k]["methods"][m].get("speedup", 0) for k in keys], width, label=m)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=20, fontsize=7)
        ax.set_ylabel("speedup vs vanilla")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["speedup_png"] = base + "-speedup.png"
        fig.savefig(out["speedup_png"], dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m in methods:
            hist: Dict[int, int] = {}
            for k in keys:
                for a, c in results[k]["methods"][m].get("accept_histogram", {}).items():
                    hist[int(a)] = hist.get(int(a), 0) + c
            if hist:
                xs = sorted(hist)
                n = sum(hist.values())
                ax.plot(xs, [hist[x] / n for x in xs], marker="o", label=m)
        ax.set_xlabel("accepted draft tokens per round")
        ax.set_ylabel("fraction of rounds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["accept_png"] = base + "-accept.png"
        fig.savefig(out["accept_png"], dpi=120)
        plt.close(fig)
    return out

