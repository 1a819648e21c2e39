"""The hass-ext command line: generate, chat, eval, tree-profile and the training commands.

Arguments are checked before any model is loaded. ``hass-ext --help`` is answered by the console script
(``hass_ext_cli``) without importing this package.
"""
import argparse
import json
import os
import shlex
import sys

import torch

from .draft_io import load_draft, resolve_draft, save_profile
from .generate import check_generation_args, encode_prompts, generate, stream
from .target import check_device, resolve_target
from .tree import check_tree_options
from .tree_choice import DEFAULT_SHAPES, TREE_OPTIONS, given_tree, measure_acceptance, resolve_tree

# The packaged ShareGPT file holds 17671 records; the packaged drafts were trained on the first 9400.
TREE_PROFILE_START = 17000
DEFAULT_BATCH_SIZE = 8  # generate --prompts-file: rows per batch
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _add_model_args(p):
    p.add_argument("--model", default=None,
                   help="target model: a local Hugging Face folder or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct, works offline)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="target dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _load(args):
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    return resolve_target(args.model, dtype=dtype, device=args.device)


def _add_draft_args(p):
    p.add_argument("--draft", default=None,
                   help="speculative decoding with this draft: a checkpoint folder (EAGLE/HASS layout) or "
                        "'default' (the packaged draft); without it, vanilla decoding")
    _add_tree_args(p)
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, decode one prompt with eager rounds instead of replaying them from a CUDA graph "
                        "(the same output)")
    p.add_argument("--stats", action="store_true",
                   help="also decode with the target alone and report tau, tokens/s and the speedup, and where "
                        "the tree's round costs came from")


def _add_tree_args(p):
    p.add_argument("--total-tokens", default=None,
                   help="draft tree size in nodes, root included, or 'auto' (the default): size, depth and top-k "
                        "chosen for this device from the draft's acceptance profile and the measured cost of a "
                        "round (--stats shows the choice)")
    p.add_argument("--depth", type=int, default=None,
                   help="draft tree levels (default: chosen with 'auto', 6 with a given --total-tokens)")
    p.add_argument("--tree-topk", type=int, default=None,
                   help="children kept per expanded node (default: chosen with 'auto', 10 with a given "
                        "--total-tokens)")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure the round costs behind 'auto' again instead of reading them from the cache "
                        "(also: HASS_EXT_RECALIBRATE=1)")


def _tree_options(args):
    opts = {}
    if getattr(args, "total_tokens", None) is not None:
        t = args.total_tokens
        opts["total_tokens"] = t if t == "auto" else int(t) if t.lstrip("-").isdigit() else t
    for name in ("depth", "tree_topk"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    if getattr(args, "recalibrate", False):
        opts["recalibrate"] = True
    if opts and not getattr(args, "draft", None):
        raise ValueError("--total-tokens/--depth/--tree-topk/--recalibrate need --draft")
    return opts


def check_args(args) -> None:
    """ValueError naming the first bad argument: run before anything is loaded."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    tree = _tree_options(args)
    if args.command == "generate":
        _check_prompt_source(args)
    if args.command in ("generate", "chat"):
        check_generation_args(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.draft, tree)
    elif args.command == "eval":
        for t in args.temperatures:
            check_generation_args(args.max_new_tokens, t, 1.0, 0, None, {})
    elif args.command == "tree-profile":
        for name in ("start", "num_prompts", "max_new_tokens"):
            v = getattr(args, name)
            if v < (0 if name == "start" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'start' else '> 0'}, "
                                 f"got {v}")
    if tree and args.command not in ("generate", "chat"):  # generate's check covers them
        given_tree(**tree)


def _generation_kwargs(args, target, draft=None):
    graphs = {"cuda_graphs": False} if getattr(args, "no_cuda_graphs", False) else {}
    return dict(target=target, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, draft=draft, **graphs, **_tree_options(args))


def _load_draft(args, target):
    if getattr(args, "draft", None) in (None, "default"):
        return getattr(args, "draft", None)
    return load_draft(args.draft, target=target)


def _stats(prompt, kwargs, result, file=None):
    """--stats: decode the same prompt with the target alone and compare; say where the round costs came from."""
    file = file or sys.stderr  # looked up per call: sys.stderr may be replaced after import
    if kwargs.get("draft") is None:
        print("[--stats: no --draft, nothing to compare with vanilla decoding]", file=file)
        return
    base = generate(prompt, **{k: v for k, v in kwargs.items() if k != "draft" and k not in TREE_OPTIONS})
    if result.tree is not None:
        print(f"[{result.tree.describe()}]", file=file)
    if result.calibration is not None:
        print(f"[calibration: {result.calibration.describe()}; set-up {result.setup_seconds:.2f} s, not counted "
              f"in tokens/s]", file=file)
    print(f"[tau {result.mean_accept_length:.2f} over {result.num_rounds} rounds; speculative "
          f"{result.tokens_per_second:.1f} tokens/s, vanilla {base.tokens_per_second:.1f} tokens/s: speedup "
          f"{result.tokens_per_second / base.tokens_per_second:.2f}x]", file=file)


class ReplyInterrupted(Exception):
    """Ctrl-C while a reply streamed; ``text`` is what was shown of it."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _print_stream(prompt, kwargs):
    gen = stream(prompt, **kwargs)
    shown = []
    try:
        while True:
            try:
                piece = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        gen.close()
        sys.stdout.write("\n")
        raise ReplyInterrupted("".join(shown)) from None
    sys.stdout.write("\n")
    return result


def _report(result, file=None):
    file = file or sys.stderr
    print(f"[{result.num_new_tokens} tokens in {result.elapsed:.2f} s: {result.tokens_per_second:.1f} tokens/s]",
          file=file)


def cmd_generate(args):
    if args.prompts_file is not None:
        return _generate_file(args)
    target = _load(args)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    kwargs = _generation_kwargs(args, target, _load_draft(args, target))
    kwargs["chat"] = False if args.raw else None
    try:
        result = _print_stream(prompt, kwargs)
    except ReplyInterrupted:
        return 130
    _report(result)
    if args.stats:
        _stats(prompt, kwargs, result)
    return 0


# ---- generate --prompts-file: a JSONL file of prompts, decoded in batches ------------------------------------

PROMPT_KEYS = ("prompt", "messages", "input_ids")
LINE_OPTIONS = ("max_new_tokens", "seed")


def _check_prompt_source(args) -> None:
    """One prompt or one prompts file, the options that go with each; the file read and checked (args.entries)."""
    if args.prompts_file is None:
        if args.prompt is None:
            raise ValueError("give a prompt, - to read it from standard input, or --prompts-file FILE.jsonl")
        for name in ("batch_size", "output"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} applies to --prompts-file")
        return
    if args.prompt is not None:
        raise ValueError("give either a prompt or --prompts-file, not both")
    if args.stats:
        raise ValueError("--stats applies to a single prompt, not to --prompts-file")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output is not None:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise ValueError(f"--output {args.output}: the folder {folder} does not exist")
    args.entries = read_prompts_file(args.prompts_file)


def read_prompts_file(path: str) -> list:
    """The prompts of a JSONL file (``-``: standard input): ``[(line number, prompt, options)]``, blank lines
    skipped. A line is a JSON string (the prompt) or an object with exactly one of "prompt" (a string),
    "messages" (a chat list) or "input_ids" (token ids), and optionally "max_new_tokens" and "seed". ValueError
    naming the line of the first bad one; the prompts themselves are checked by the target's encode."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1
            lines = f.read().splitlines()
    entries = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            entries.append(_prompt_line(path, lineno, line))
    if not entries:
        raise ValueError(f"--prompts-file {path}: no prompts (the file is empty)")
    return entries


def _prompt_line(path: str, lineno: int, line: str):
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a line must be a JSON object or string, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(PROMPT_KEYS) - set(LINE_OPTIONS))
    if unknown:  # a misspelt option would otherwise be ignored without a word
        raise ValueError(f"{where}: unknown key(s) {unknown}; a line has one of {', '.join(PROMPT_KEYS)} and "
                         f"optionally {', '.join(LINE_OPTIONS)}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise ValueError(f"{where}: a line needs exactly one of {', '.join(PROMPT_KEYS)}, got "
                         f"{given or 'none'}")
    prompt = obj[given[0]]
    kind = {"prompt": str, "messages": list, "input_ids": list}[given[0]]
    if not isinstance(prompt, kind):
        raise ValueError(f"{where}: {given[0]!r} must be a {'string' if kind is str else 'list'}, got "
                         f"{type(prompt).__name__}")
    if given[0] == "messages" and not all(isinstance(m, dict) for m in prompt):
        raise ValueError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
    if given[0] == "input_ids" and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError(f"{where}: 'input_ids' must be a list of ints")
    options = {}
    m = obj.get("max_new_tokens")
    if "max_new_tokens" in obj:
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"{where}: max_new_tokens must be an int > 0, got {m!r}")
        options["max_new_tokens"] = m
    seed = obj.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{where}: seed must be an int or null, got {seed!r}")
        options["seed"] = seed
    return lineno, prompt, options


def _generate_file(args):
    """generate --prompts-file: every prompt of the file, in batches of --batch-size, one JSON line each."""
    path = args.prompts_file
    entries = args.entries
    target = _load(args)
    chat = False if args.raw else None
    # every prompt encoded before any decoding: a bad line fails the run early
    prompts = encode_prompts(target, [p for _, p, _ in entries], chat, [f"{path}:{n}" for n, _, _ in entries])
    max_new = [o.get("max_new_tokens", args.max_new_tokens) for _, _, o in entries]
    # one --seed: prompt i of the file draws from seed + i, whatever batch it lands in (as generate's one seed)
    seeds = [o.get("seed", None if args.seed is None else args.seed + i) for i, (_, _, o) in enumerate(entries)]
    kwargs = _generation_kwargs(args, target, _load_draft(args, target))
    size = args.batch_size or DEFAULT_BATCH_SIZE
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    tokens, seconds = 0, 0.0
    trees = {}
    try:
        for lo in range(0, len(prompts), size):  # one call per batch: each batch's lines are written as it ends
            hi = min(lo + size, len(prompts))
            kwargs.update(max_new_tokens=max_new[lo:hi], seed=seeds[lo:hi])
            results = generate(prompts[lo:hi], batch_size=size, **kwargs)
            kwargs.pop("recalibrate", None)  # measured again once, not for every batch
            for i, r in enumerate(results, lo):
                out.write(json.dumps(result_record(i, r)) + "\n")
            out.flush()
            tokens += sum(r.num_new_tokens for r in results)
            seconds += max(r.elapsed for r in results)  # a row's elapsed runs from its batch's start
            if results[0].tree is not None and hi - lo not in trees:
                trees[hi - lo] = results[0].tree.describe()
    finally:
        if out is not sys.stdout:
            out.close()
    for b, text in sorted(trees.items()):
        print(f"[batch of {b}: {text}]", file=sys.stderr)
    rate = tokens / seconds if seconds > 0 else float("inf")
    print(f"[{len(prompts)} prompts in batches of {size}: {tokens} tokens in {seconds:.2f} s: {rate:.1f} "
          f"tokens/s]" + (f"; written: {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def result_record(index: int, result) -> dict:
    """One output line of generate --prompts-file."""
    return {"index": index, "text": result.text, "token_ids": list(result.token_ids),
            "stop_reason": result.stop_reason, "num_new_tokens": result.num_new_tokens,
            "num_rounds": result.num_rounds, "mean_accept_length": result.mean_accept_length,
            "elapsed": result.elapsed}


def cmd_chat(args):
    target = _load(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    kwargs = _generation_kwargs(args, target, _load_draft(args, target))
    print(f"Chatting with {target.name}. Empty line or Ctrl-D to quit; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt, Ctrl-C quits as Ctrl-D does
            print(file=sys.stderr)
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            result = _print_stream(messages, kwargs)
        except ReplyInterrupted as cut:  # the reply ends here; the chat goes on with what was shown of it
            print("[reply interrupted]", file=sys.stderr)
            messages.append({"role": "assistant", "content": cut.text})
            continue
        finally:
            kwargs.pop("recalibrate", None)  # measured again once, not for every reply
        _report(result)
        if args.stats:
            _stats(list(messages), kwargs, result)
        messages.append({"role": "assistant", "content": result.text})
    return 0


def _parse_drafts(specs, target):
    """--draft NAME=PATH (or PATH, or "default") -> {name: loaded draft}."""
    drafts = {}
    for spec in specs or []:
        name, _, path = spec.partition("=") if "=" in spec else (os.path.basename(spec.rstrip("/")), "", spec)
        if path == "default":
            drafts[name] = "default"
            continue
        drafts[name] = load_draft(path, target=target)
    return drafts


def cmd_eval(args):
    from .speed_eval import evaluate, markdown_table, write_results  # start-up time of the other commands

    target = _load(args)
    drafts = _parse_drafts(args.draft, target)
    settings = dict(datasets=args.datasets, temperatures=args.temperatures, num_questions=args.num_questions,
                    max_new_tokens=args.max_new_tokens, turns=args.turns, target=target.name,
                    drafts=args.draft or [])
    tree = _tree_options(args)
    if tree.pop("recalibrate", False):  # measured again once here, then every prompt reuses the measurement
        for draft in drafts.values():
            resolve_tree(target, resolve_draft(draft, target), recalibrate=True, **tree)
    settings.update(tree)
    results = evaluate(target, drafts, datasets=args.datasets, temperatures=args.temperatures,
                       num_questions=args.num_questions, max_new_tokens=args.max_new_tokens, turns=args.turns,
                       seed=args.seed or 0, **tree)
    command = "hass-ext " + " ".join(shlex.quote(a) for a in args.argv)
    paths = write_results(results, args.out_dir, args.name, command, settings)
    print(markdown_table(results))
    print("written: " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def _calibration_prompts(source: str, start: int, count: int) -> list:
    """First user turns: of ShareGPT records from ``start`` ("sharegpt"), or of a question file / packaged
    dataset (hass_ext.speed_eval.load_questions)."""
    if source == "sharegpt":
        from .train.conversations import first_user_turns  # start-up time of the other commands

        return first_user_turns("sharegpt", start, count)
    from .speed_eval import load_questions  # start-up time of the other commands

    return [q["turns"][0] for q in load_questions(source)[start:start + count]]


def _shapes(specs):
    """--shapes NODES:DEPTH:TOPK ... -> [(n, d, k)] (checked)."""
    try:
        shapes = [tuple(int(x) for x in s.split(":")) for s in specs]
    except ValueError:
        raise ValueError(f"--shapes takes NODES:DEPTH:TOPK items, got {specs}") from None
    if any(len(s) != 3 for s in shapes):
        raise ValueError(f"--shapes takes NODES:DEPTH:TOPK items, got {specs}")
    for s in shapes:
        check_tree_options(*s)
    return shapes


def cmd_tree_profile(args):
    shapes = _shapes(args.shapes) if args.shapes else DEFAULT_SHAPES
    prompts = _calibration_prompts(args.prompts, args.start, args.num_prompts)
    if not prompts:
        raise ValueError(f"no calibration prompts in {args.prompts!r} from --start {args.start}: the range is past "
                         f"the end of the data or holds no usable first turns; choose a smaller --start "
                         f"(default {TREE_PROFILE_START})")
    target = _load(args)
    draft = load_draft(args.draft, target=target)
    profile = measure_acceptance(target, draft, prompts, shapes, max_new_tokens=args.max_new_tokens)
    path = save_profile(profile, args.draft)
    for s in sorted(profile["shapes"], key=lambda s: -s["tau"]):
        print(f"{s['total_tokens']:>4} nodes, depth {s['depth']}, top-k {s['tree_topk']:>2}: tau {s['tau']:.3f}")
    print(f"written: {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hass-ext",
        description="HASS speculative decoding: faster LLM generation with unchanged output.",
        epilog="Run 'hass-ext COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="generate a continuation of a prompt, streaming the text",
                       description="Generate text for a prompt (wrapped as a user turn of the chat template "
                                   "unless --raw) and print the speed; or, with --prompts-file, for every prompt "
                                   "of a JSONL file, decoded in batches, one JSON line per prompt.")
    g.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text, or - to read it from standard input (not with --prompts-file)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    g.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                   help="one prompt per line (- for standard input): a JSON string, or an object with \"prompt\" "
                        "(text), \"messages\" (a chat list) or \"input_ids\", and optionally \"max_new_tokens\" "
                        "and \"seed\" (default: the options' values; one --seed gives the i-th prompt seed + i); "
                        "writes one JSON line per prompt, in input order: index, text, token_ids, stop_reason, "
                        "num_new_tokens, num_rounds, mean_accept_length, elapsed (seconds from its batch's start)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"with --prompts-file: prompts decoded together (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="with --prompts-file: write the JSON lines here instead of standard output")
    _add_model_args(g)
    _add_sampling_args(g)
    _add_draft_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat", description="Chat in the terminal.")
    c.add_argument("--system", default=None, help="a system prompt")
    _add_model_args(c)
    _add_sampling_args(c)
    _add_draft_args(c)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="tau and speedup over MT-bench / HumanEval / GSM8K",
                       description="Run vanilla decoding and each --draft side by side, interleaved per prompt, "
                                   "and write JSON, Markdown and PNG results.")
    e.add_argument("--draft", action="append", metavar="[NAME=]PATH",
                   help="a draft to evaluate (repeatable); 'default' for the packaged draft")
    e.add_argument("--datasets", nargs="+", default=["mt_bench", "humaneval", "gsm8k"],
                   help="packaged dataset names or JSONL question files (default: all three)")
    e.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    e.add_argument("--num-questions", type=int, default=None, help="first N questions of each dataset")
    e.add_argument("--turns", type=int, default=2, help="turns per question (MT-bench has 2)")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out-dir", default="bench/results")
    e.add_argument("--name", default="eval", help="file name prefix of the results")
    _add_tree_args(e)
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("tree-profile", help="measure a draft's acceptance per tree shape (for --total-tokens auto)",
                       description="Replay greedy speculative decoding on calibration prompts for each tree shape and "
                                   "write DRAFT/tree_profile.json, from which generate(total_tokens='auto') picks "
                                   "the fastest shape for the device. Use prompts the draft was not trained on.")
    t.add_argument("--draft", required=True, help="the draft checkpoint folder (the profile is written there)")
    t.add_argument("--prompts", default="sharegpt",
                   help="'sharegpt' (the bundled ShareGPT records from --start) or a question file / packaged "
                        "dataset name (first turns)")
    t.add_argument("--start", type=int, default=TREE_PROFILE_START,
                   help=f"first record or question to use (default {TREE_PROFILE_START}: ShareGPT records the "
                        f"packaged drafts were not trained on)")
    t.add_argument("--num-prompts", type=int, default=12)
    t.add_argument("--max-new-tokens", type=int, default=96)
    t.add_argument("--shapes", nargs="+", metavar="NODES:DEPTH:TOPK", default=None,
                   help="tree shapes to measure (default: chains, shallow wide trees, small trees and the EAGLE-2 "
                        "trees)")
    _add_model_args(t)
    t.set_defaults(func=cmd_tree_profile)

    from .train.cli import (add_prepare_data_parser, add_regenerate_parser, add_token_map_parser,  # start-up
                            add_train_parser)

    add_regenerate_parser(sub)
    add_prepare_data_parser(sub)
    add_train_parser(sub)
    add_token_map_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, as stored with results
    try:
        check_args(args)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hass-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
