"""The hass-ext command line: generate, chat, eval, tree-profile and the training commands.

Arguments are checked before any model is loaded. ``hass-ext --help`` is answered by the console script
(``hass_ext_cli``) without importing this package.
"""
import argparse
import os
import shlex
import sys

import torch

from .draft_io import load_draft, resolve_draft, save_profile
from .generate import check_generation_args, generate, stream
from .target import check_device, resolve_target
from .tree import check_tree_options
from .tree_choice import DEFAULT_SHAPES, TREE_OPTIONS, given_tree, measure_acceptance, resolve_tree

# The packaged ShareGPT file holds 17671 records; the packaged drafts were trained on the first 9400.
TREE_PROFILE_START = 17000
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
    return dict(target=target, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, draft=draft, **_tree_options(args))


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
                                   "unless --raw) and print the speed.")
    g.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
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
                   help="tree shapes to measure (default: chains, small trees and the EAGLE-2 trees)")
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
