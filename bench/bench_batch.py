"""Batched decoding: tokens/s of vanilla and speculative decoding at batch sizes B = 1, 2, 4, 8, side by side.

    python bench/bench_batch.py                          # 8 prompts, 64 new tokens, B = 1, 2, 4, 8 (CPU: minutes)
    python bench/bench_batch.py --batches 1,2 --prompts 2 --max-new-tokens 8       # a tiny run (checks it works)
    python bench/bench_batch.py --rounds --device cuda   # GPU: batched round costs, random Llama-3-8B weights
    python bench/bench_batch.py --rounds --tiny          # the same on a tiny random model (seconds on a CPU)
    python bench/bench_batch.py --quick                  # = --rounds --tiny (bench/run_all.py --quick)

Default mode: the default target (SmolLM2-135M-Instruct) and its shipped draft, greedy, on first turns of the
evaluation question files (MT-bench, HumanEval, GSM8K, taken in turn). For each B, ``hass_ext.generate(prompts,
batch_size=B)`` decodes all prompts in batches of B, once with the target alone and once with the draft, the
automatic tree chosen for B (``total_tokens="auto"``: the costs of batched rounds weigh in). tokens/s = new
tokens / decoding seconds, a batch lasting until its last row ends (the tree choice and its calibration are
set-up, not counted). Every row of every run is compared token for token with the prompt's B=1 vanilla output.
Writes bench/results/batch_<device>-<stamp>.json and .md.

--rounds: no text; a random-weight Llama target (bench_round.py's shapes: llama3-8b = hidden 4096, 32 heads, 8 KV
heads, vocab 128256) with a random draft. For each B, hass_ext.batch.measure_batch_costs times one batched
round per tree shape (B draft trees, the verification forward over B x nodes tokens, the draft's context pass)
and one batched vanilla step after a --context-token prompt per row; reported in vanilla steps (at B and at
B = 1). Then greedy speculative decoding of B rows of different lengths is checked against each row decoded
alone. Writes bench/results/batch_round_<device>_<attn>.json and .md (-quick with --tiny).
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hass_ext  # noqa: E402
from hass_ext.atomic_io import atomic_write_text  # noqa: E402
from hass_ext.draft_io import resolve_draft  # noqa: E402
from hass_ext.tree_choice import resolve_tree  # noqa: E402
from hass_ext.speed_eval import DATASETS, first_turns, machine_info  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "bfloat16", "float16")


def int_list(text: str) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"ints >= 1, got {text!r}")
    return sorted(set(values))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int_list, default=[1, 2, 4, 8], help="batch sizes (default 1,2,4,8)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="default float32 on the CPU; bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="--rounds --tiny: checks that it runs, in seconds")
    g = ap.add_argument_group("generate mode (default)")
    g.add_argument("--prompts", type=int, default=8, help="prompts, first turns of the eval files (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--draft", default="default", help="the draft (default: the one shipped for the target)")
    g.add_argument("--repeats", type=int, default=1,
                   help="sweeps over the batch sizes, alternately up and down (median tokens/s; default 1)")
    g.add_argument("--recalibrate", action="store_true",
                   help="measure the round costs behind the automatic tree again (once per batch size)")
    r = ap.add_argument_group("--rounds mode (random weights)")
    r.add_argument("--rounds", action="store_true", help="batched round costs on a random-weight Llama target")
    r.add_argument("--tiny", action="store_true", help="tiny random Llama, context 64, fp32: seconds on a CPU")
    r.add_argument("--shape", default=None, help="bench_round.py shape (default llama3-8b on CUDA, smollm2-135m "
                                                 "on the CPU)")
    r.add_argument("--layers", type=int, default=None, help="override the number of target layers")
    r.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    r.add_argument("--context", type=int, default=None, help="prompt tokens per row (default 1024; 64 with --tiny)")
    r.add_argument("--trees", default="60/6/10,16/4/4,8/4/2",
                   help="tree shapes TOTAL/DEPTH/TOPK, comma-separated (default %(default)s)")
    r.add_argument("--tau", type=float, default=1.0,
                   help="tokens the draft's context pass takes per row and round (random weights accept "
                        "nothing: default 1)")
    r.add_argument("--cost-repeats", type=int, default=None, help="timed repeats per B (default 5; 2 with --tiny)")
    r.add_argument("--attn", choices=("hass_tree", "sdpa"), default="hass_tree",
                   help="target attention (default hass_tree, generate's default)")
    r.add_argument("--check-tokens", type=int, default=8,
                   help="greedy tokens per row of the batched-vs-alone check at the largest B (0: no check)")
    r.add_argument("--budget", type=float, default=None,
                   help="seconds after which no further batch size is started (results so far are written)")
    args = ap.parse_args(argv)
    if args.quick:  # the generate mode measures the tree's round costs first: minutes, too long for a check
        args.rounds = args.tiny = True
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        ap.error("--prompts, --max-new-tokens and --repeats must be >= 1")
    if not args.rounds and max(args.batches) > args.prompts:  # a batch of B needs B prompts to be one
        ap.error(f"--batches {max(args.batches)} needs at least that many --prompts, got {args.prompts}")
    return args


# ---- generate mode: the default target end to end ------------------------------------------------------------

def eval_prompts(n: int) -> list:
    """n first turns taken in turn from the eval files (MT-bench, HumanEval, GSM8K): a mix of lengths."""
    per_file = -(-n // len(DATASETS))
    by_file = [[t for name, t in first_turns(per_file, [d])] for d in DATASETS]
    mixed = [rows[i] for i in range(per_file) for rows in by_file if i < len(rows)]
    return mixed[:n]


def run_once(prompts, target, draft, B: int, max_new_tokens: int, recalibrate: bool):
    """One generate call over all prompts in batches of B: (results, decoding seconds). With a draft, the tree is
    the automatic choice for B, used even where that choice says vanilla is faster (generate(total_tokens="auto")
    then decodes without the draft: the table says so), so the speculative column is always measured."""
    opts = {}
    if draft is not None:
        choice = resolve_tree(target, resolve_draft(draft, target), batch=min(B, len(prompts)),
                              recalibrate=recalibrate)
        opts = dict(draft=draft, **choice.options())
    results = hass_ext.generate(prompts, target=target, max_new_tokens=max_new_tokens, batch_size=B, **opts)
    if draft is not None:
        for r in results:
            r.tree = choice
    # a batch lasts until its last row ends; each row's elapsed runs from its batch's start
    seconds = sum(max(r.elapsed for r in results[lo:lo + B]) for lo in range(0, len(results), B))
    return results, seconds


def generate_mode(args, argv) -> int:
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    target = hass_ext.load_target(dtype=dtype, device=args.device)
    draft = args.draft if args.draft == "default" else hass_ext.load_draft(args.draft, target=target)
    prompts = eval_prompts(args.prompts)
    batches = args.batches
    # warm-up (untimed): first calls pay one-off costs; the B=1 tree is chosen (calibrated if not cached) here
    hass_ext.generate(prompts[:1], target=target, max_new_tokens=2)
    hass_ext.generate(prompts[:1], target=target, draft=draft, max_new_tokens=2)

    runs = {(B, m): [] for B in batches for m in ("vanilla", "speculative")}
    reference = None
    if 1 not in batches:  # the B=1 vanilla outputs every row is compared with
        reference = [r.token_ids for r in run_once(prompts, target, None, 1, args.max_new_tokens, False)[0]]
    start = time.perf_counter()
    for rep in range(args.repeats):
        for B in (batches if rep % 2 == 0 else batches[::-1]):  # alternate the order: drift affects all alike
            for method, d in (("vanilla", None), ("speculative", draft)):
                results, seconds = run_once(prompts, target, d, B, args.max_new_tokens,
                                            args.recalibrate and rep == 0)
                runs[(B, method)].append((results, seconds))
                if reference is None and B == 1 and method == "vanilla":
                    reference = [r.token_ids for r in results]
                tokens = sum(r.num_new_tokens for r in results)
                print(f"B={B} {method}: {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s)",
                      file=sys.stderr)
    wall = time.perf_counter() - start

    def rate(B, method):
        return statistics.median(sum(r.num_new_tokens for r in res) / s for res, s in runs[(B, method)])

    def identical(B, method):
        return sum(r.token_ids == ref for res, _ in runs[(B, method)] for r, ref in zip(res, reference))

    base = {m: rate(batches[0], m) for m in ("vanilla", "speculative")}
    rows, trees = [], {}
    for B in batches:
        spec = runs[(B, "speculative")][0][0]
        # the tree of each batch (a last, smaller batch has its own)
        trees[B] = {str(len(spec[lo:lo + B])): spec[lo].tree.to_dict() for lo in range(0, len(spec), B)}
        tree = spec[0].tree
        accepts = [a for res, _ in runs[(B, "speculative")] for r in res for a in r.accept_lengths]
        v, s = rate(B, "vanilla"), rate(B, "speculative")
        n = len(prompts) * args.repeats
        rows.append({
            "B": B, "tree": f"{tree.total_tokens}/{tree.depth}/{tree.tree_topk}",
            "expected_speedup": tree.expected_speedup if tree.expected_speedup is not None else "",
            "vanilla_tok_s": v, "speculative_tok_s": s, "speculative_x_vanilla": s / v,
            "auto_decodes_with": "vanilla (faster here)" if tree.vanilla_is_faster else "the draft",
            f"vanilla_x_B{batches[0]}": v / base["vanilla"],
            f"speculative_x_B{batches[0]}": s / base["speculative"],
            "tau": sum(a + 1 for a in accepts) / len(accepts) if accepts else 1.0,
            "identical_vanilla": f"{identical(B, 'vanilla')}/{n}",
            "identical_speculative": f"{identical(B, 'speculative')}/{n}"})
    same = sum(identical(B, m) for B in batches for m in ("vanilla", "speculative"))
    total = 2 * len(batches) * len(prompts) * args.repeats
    device = "cuda" if target.device.type == "cuda" else "cpu"
    settings = dict(target=target.name, draft=args.draft, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                    batches=batches, repeats=args.repeats, dtype=str(dtype).replace("torch.", ""),
                    threads=torch.get_num_threads(), temperature=0.0, tree="auto")
    notes = (f"{len(prompts)} first turns of {', '.join(DATASETS)} (taken in turn), greedy, {args.max_new_tokens} "
             f"new tokens at most, decoded in batches of B by hass_ext.generate(prompts, batch_size=B), vanilla "
             f"and speculative (draft {args.draft}, the automatic tree for B, used even where that choice finds "
             f"vanilla faster: generate(total_tokens='auto') then decodes without the draft, see auto_decodes_with) "
             f"side by side in one process. tokens/s = new "
             f"tokens / decoding seconds (a batch lasts until its last row ends; tree choice and calibration not "
             f"counted){'; the median of ' + str(args.repeats) + ' sweeps' if args.repeats > 1 else ''}. "
             f"x_B{batches[0]}: throughput relative to B={batches[0]} of the same method. identical: rows "
             f"token-identical to the prompt's B=1 vanilla output ({same}/{total} in all). On a shared CPU only the "
             f"ratios measured side by side count.")
    command = "python bench/bench_batch.py " + " ".join(shlex.quote(a) for a in argv)
    paths = write_generate_results(f"batch_{device}", rows, args.out_dir, command, settings, notes,
                                   {"trees": trees, "wall_seconds": wall,
                                    "runs": {f"{B}/{m}": [{"seconds": s, "tokens": [r.num_new_tokens for r in res],
                                                           "accept_lengths": [r.accept_lengths for r in res]}
                                                          for res, s in v]
                                             for (B, m), v in runs.items()}}, device)
    print(f"identical to B=1 vanilla: {same}/{total}; written: {', '.join(paths)}")
    return 0 if same == total or dtype != torch.float32 else 1


def table(rows) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def write_generate_results(name, rows, out_dir, command, settings, notes, extra, device) -> list:
    """<out_dir>/<name>-<stamp>.json and .md, as bench_speedup's results (command, settings, machine, table)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"{name}-{stamp}")
    machine = machine_info(device)
    doc = {"benchmark": name, "command": command, "settings": settings, "machine": machine, "notes": notes,
           "rows": rows, "date": machine["date"], **extra}
    atomic_write_text(base + ".json", json.dumps(doc, indent=2))
    md = (f"# {name}\n\nCommand: `{command}`\n\nMachine: {machine}\n\nSettings: {settings}\n\n{notes}\n\n"
          + table(rows) + "\n")
    atomic_write_text(base + ".md", md)
    print(md)
    return [base + ".json", base + ".md"]


# ---- --rounds: batched round costs on random weights ------------------------------------------------------

def parse_trees(text: str) -> list:
    from hass_ext.tree import check_tree_options

    shapes = []
    for item in text.split(","):
        try:
            n, d, k = (int(x) for x in item.split("/"))
            check_tree_options(n, d, k)
        except ValueError as e:
            raise SystemExit(f"--trees: TOTAL/DEPTH/TOPK items with TOPK <= TOTAL, got {item!r} ({e})")
        shapes.append((n, d, k))
    return shapes


def check_rows_alone(target, draft, B: int, context: int, tokens: int, tree) -> tuple:
    """Greedy speculative decoding of B random prompts of different lengths in one batch against each prompt
    decoded alone with the target (vanilla): (identical rows, B)."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, target.config.vocab_size, (max(1, context - 3 * b),), generator=g).tolist()
               for b in range(B)]
    n, d, k = tree
    batched = hass_ext.generate(prompts, target=target, draft=draft, max_new_tokens=tokens, total_tokens=n,
                                depth=d, tree_topk=k)
    alone = [hass_ext.generate(p, target=target, max_new_tokens=tokens).token_ids for p in prompts]
    return sum(r.token_ids == a for r, a in zip(batched, alone)), B


def rounds_mode(args) -> int:
    import bench_round  # the random Llama targets and attention switch of bench_round.py
    from common import write
    from hass_ext.batch import measure_batch_costs

    t0 = time.perf_counter()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    args.shape = args.shape or ("llama3-8b" if cuda else "smollm2-135m")
    if not args.tiny and args.shape not in bench_round.SHAPES:
        raise SystemExit(f"--shape must be one of {', '.join(s for s in bench_round.SHAPES if s != 'tiny')}")
    args.context = args.context or (64 if args.tiny else 1024)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda and not args.tiny else torch.float32)
    repeats = args.cost_repeats or (2 if args.tiny else 5)
    shapes = parse_trees(args.trees)
    torch.set_grad_enabled(False)
    target, draft, shape = bench_round.build(args, dev, dtype)
    bench_round.set_attention(target, args.attn)
    taus = {s: args.tau for s in shapes}
    built = time.perf_counter() - t0

    rows, done, step1 = [], [], None
    config = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "attention": args.attn,
              "dtype": str(dtype).replace("torch.", ""), "shape": "tiny" if args.tiny else args.shape, **shape,
              "context": args.context, "tau": args.tau, "repeats": repeats}
    name = "batch_round_" + (config["device"].replace(" ", "_") if cuda else "cpu") + "_" + args.attn
    if args.context != (64 if args.tiny else 1024):
        name += f"-ctx{args.context}"
    summary = {"build_seconds": built, "batches_done": done, "check": None}

    def save():
        unit = "ms"
        notes = (f"Random-weight Llama target ({config['shape']}, {config['dtype']}, {args.attn} attention) with a "
                 f"random draft, {args.context}-token prompt per row. hass_ext.batch.measure_batch_costs: one batched "
                 f"round (B draft trees, the verification forward over B x nodes tokens, the draft's context pass "
                 f"over {args.tau:g} token(s) per row) and one batched vanilla step, the median of {repeats}. "
                 f"round_x_step: round / vanilla step at the same B (the tokens per row a round must commit to "
                 f"match batched vanilla decoding); round_x_step_B1: round / one B=1 vanilla step; step_x_step_B1: "
                 f"the batched vanilla step / the B=1 step. "
                 + ("CUDA: absolute times." if cuda else "CPU: only the ratios count."))
        check = summary["check"]
        if check:
            notes += (f" Batched greedy speculative decoding of {check['B']} rows of different lengths "
                      f"({args.check_tokens} tokens, tree {check['tree']}) vs each row alone: identical "
                      f"{check['identical']}/{check['B']}.")
        write(name, rows, args.out_dir, notes, args.tiny, config, {"summary": summary, "unit": unit})

    for B in args.batches:
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            print(f"budget of {args.budget:g} s spent: B={B} and larger not measured", file=sys.stderr)
            break
        costs, step = measure_batch_costs(target, draft, shapes, taus, B, context=args.context, repeats=repeats)
        if step1 is None:
            step1 = step if B == 1 else None
        for s in shapes:
            rows.append({"B": B, "tree": "/".join(map(str, s)), "round_ms": costs[s] * 1e3,
                         "vanilla_step_ms": step * 1e3, "round_x_step": costs[s] / step,
                         "round_x_step_B1": costs[s] / step1 if step1 else "",
                         "step_x_step_B1": step / step1 if step1 else ""})
        done.append(B)
        save()  # after every B: whatever was measured is kept if the step is stopped
        print(f"B={B}: vanilla step {step * 1e3:.2f} ms; " + ", ".join(
            f"{'/'.join(map(str, s))} {costs[s] * 1e3:.2f} ms" for s in shapes), file=sys.stderr)

    ok = True
    over = args.budget is not None and time.perf_counter() - t0 > args.budget
    if args.check_tokens and done and not over:
        tree = min(shapes)  # the smallest tree: the check is about the rows, not the shape
        same, B = check_rows_alone(target, draft, max(done), args.context, args.check_tokens, tree)
        summary["check"] = {"B": B, "identical": same, "tree": "/".join(map(str, tree))}
        save()
        print(f"batched rows identical to lone decoding: {same}/{B}")
        if same != B:
            # in 16-bit a random model's near-tied logits can flip between a tree forward and single steps
            ok = dtype != torch.float32
            print(("warning: " if ok else "error: ") + "batched greedy speculative rows differ from lone decoding",
                  file=sys.stderr)
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds:
        return rounds_mode(args)
    if args.tiny:
        raise SystemExit("--tiny goes with --rounds (the generate mode uses the default target)")
    return generate_mode(args, argv)


if __name__ == "__main__":
    sys.exit(main())
