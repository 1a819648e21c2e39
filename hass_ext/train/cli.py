"""The ``regenerate``, ``prepare-data``, ``train`` and ``token-map`` subcommands of ``hass-ext`` (also runnable as ``python -m hass_ext.train.cli``).

Multi-process training: ``torchrun --nproc_per_node N -m hass_ext.train.cli train ...``.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from ..draft_io import CONFIG_NAME, PROFILE_NAME, TOKEN_MAP_NAME, save_token_map
from ..target import resolve_target
from .align import ATTENTION_MODES
from .data import prepare_data
from .loss import MASK_ALIGNMENTS
from .regenerate import regenerate
from .shards import read_manifest
from .token_map import hot_vocabulary, template_token_ids, token_frequencies
from .trainer import MODES, TrainConfig, Trainer, TrainingInterrupted


# ---- arguments shared by the commands that run the target over conversations (prepare-data, regenerate) ----

def _add_source_args(p) -> None:
    p.add_argument("--target", default=None, help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--conversations", default="sharegpt",
                   help="'sharegpt' (the bundled ShareGPT V3) or a JSON/JSONL file of {conversations: [...]} records")


def _add_selection_args(p) -> None:
    p.add_argument("--num-conversations", type=int, default=None, help="how many records (default: all)")
    p.add_argument("--start", type=int, default=0, help="first record (default 0)")
    p.add_argument("--seed", type=int, default=None, help="shuffle the records with this seed first (default: file order)")


def _add_device_args(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="target dtype (default: float32 on CPU, bfloat16 on CUDA)")


def _cli_target(args):


    return resolve_target(args.target, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)


def add_prepare_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare-data", help="conversations -> target features -> training shards (resumable)",
        description="Render ShareGPT-style conversations with the target's chat template, mark the assistant tokens, "
                    "run the target and write safetensors shards + manifest.json. Re-run the same command to "
                    "resume an interrupted run.")
    _add_source_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-len", type=int, default=2048, help="tokens kept per conversation (default 2048)")
    _add_selection_args(p)
    p.add_argument("--shard-size", type=int, default=256, help="conversations per shard (default 256)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per target forward (default 16384)")
    p.add_argument("--system-prompt", default=None, help="system message for every conversation "
                   "(default: none, the chat template's default applies)")
    p.add_argument("--hidden-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the stored target features (default bfloat16)")
    _add_device_args(p)
    p.add_argument("--stop-after-shards", type=int, default=None, help="stop after writing this many new shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare_data)
    return p


def run_prepare_data(args) -> int:

    target = _cli_target(args)
    m = prepare_data(target, args.conversations, args.out, max_len=args.max_len,
                     num_conversations=args.num_conversations, start=args.start, seed=args.seed,
                     shard_size=args.shard_size, batch_tokens=args.batch_tokens, system_prompt=args.system_prompt,
                     hidden_dtype=args.hidden_dtype, progress=not args.no_progress,
                     stop_after_shards=args.stop_after_shards)
    print(json.dumps({"out": args.out, "complete": m["complete"], "shards": len(m["shards"]),
                      "examples": m["num_examples"], "tokens": m["num_tokens"], "skipped": m["skipped"]}))
    return 0


def add_regenerate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "regenerate", help="self-distillation data: the target's greedy answers to first user turns (resumable)",
        description="Answer the first user turn of each selected conversation with the target's own greedy "
                    "decoding and append the pairs to a JSON Lines file that prepare-data reads. Re-run the same "
                    "command to resume.")
    _add_source_args(p)
    p.add_argument("--out", required=True, help="output JSON Lines file (appended to)")
    _add_selection_args(p)
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default 16)")
    _add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_regenerate)
    return p


def run_regenerate(args) -> int:

    target = _cli_target(args)
    counts = regenerate(target, args.conversations, args.out, num_conversations=args.num_conversations,
                        start=args.start, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        progress=not args.no_progress)
    print(json.dumps({"out": args.out, **counts}))
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:

    d = TrainConfig(data_dir="", out_dir="")
    p = subparsers.add_parser(
        "train", help="train a HASS or EAGLE draft on prepared data",
        description="Train a draft head on a prepare-data folder. Writes checkpoints, log.jsonl and the final draft "
                    "(EAGLE layout) to OUT/draft. A checkpoint is written every --save-every steps, at the end and "
                    "on Ctrl-C / SIGTERM (the step in progress finishes first); continue a stopped run with the same "
                    "command plus --resume. Use torchrun for several processes.")
    p.add_argument("--data", required=True, help="prepared data folder (prepare-data output)")
    p.add_argument("--out", required=True,
                   help="output folder: new or empty, or the folder of the run to continue with --resume")
    p.add_argument("--target", default=None, help="model folder or hub id (default: the one in the data manifest)")
    p.add_argument("--mode", choices=MODES, default="hass",
                   help="hass: harmonized context alignment + top-K loss (default); eagle: the EAGLE baseline")
    p.add_argument("--align-steps", type=int, default=None, help="J (default 3 for hass, 1 for eagle)")
    p.add_argument("--topk", type=int, default=d.topk, help=f"K of the top-K distillation loss (default {d.topk})")
    p.add_argument("--topk-w", type=float, default=None, help="top-K loss weight (default 1 for hass, 0 for eagle)")
    p.add_argument("--v-w", type=float, default=d.v_w,
                   help=f"weight of the feature regression loss (SmoothL1, default {d.v_w})")
    p.add_argument("--p-w", type=float, default=d.p_w, help=f"weight of the soft cross-entropy (default {d.p_w})")
    p.add_argument("--step-weights", type=float, nargs="+", default=None,
                   help="one loss weight per alignment step (default: all 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate of AdamW (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--clip-value", type=float, default=d.clip_value,
                   help=f"gradients are clipped to [-v, v] (default {d.clip_value})")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"linear warmup over this fraction of the steps (default {d.warmup_ratio})")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (overrides --warmup-ratio)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"examples per process per step (default {d.batch_size})")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"passes over the training examples (default {d.epochs}; --max-steps overrides it)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default: epochs x steps per epoch). May differ on --resume: the learning "
                        "rate then follows the schedule of the new length from the step reached")
    p.add_argument("--max-len", type=int, default=None, help="truncate examples to this many tokens "
                   "(default: as prepared)")
    p.add_argument("--noise-std", type=float, default=d.noise_std,
                   help=f"uniform noise added to the training features (default {d.noise_std}; 0 = none)")
    p.add_argument("--noise-constant", action="store_true",
                   help="noise amplitude std instead of the reference's std * 512 / length")
    p.add_argument("--mask-alignment", choices=MASK_ALIGNMENTS, default=d.mask_alignment,
                   help="which position's loss mask a prediction uses: predicted = the token it predicts "
                        "(default); reference = the reference code's alignment")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=d.attention,
                   help="softmax of the alignment steps: proper (default) or the reference code's leaky one")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default=d.autocast,
                   help="auto: bf16 on CUDA, fp32 on CPU (default); bf16: also on CPU; off: fp32")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initialisation, data order and noise "
                   f"(default {d.seed})")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help=f"share of the examples held out for evaluation (default {d.eval_fraction})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate on the held-out examples every N steps (default 0: only at the end)")
    p.add_argument("--eval-k", type=int, default=d.eval_k,
                   help=f"chain length of the held-out k-step acceptance (default {d.eval_k})")
    p.add_argument("--eval-max-examples", type=int, default=None,
                   help="evaluate on at most this many held-out examples (default: all)")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"write a checkpoint every N steps (default {d.save_every}); 0: only at the end and when "
                        "stopped by Ctrl-C / SIGTERM")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help=f"how many of the latest checkpoints to keep (default {d.keep_checkpoints})")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"write a log.jsonl record every N steps (default {d.log_every})")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="distil over the N most frequent assistant tokens of the data only (the draft's hot "
                        "vocabulary, saved as its token map; N/V of the head's cost); default: the full vocabulary")
    p.add_argument("--init-from", default=None, help="start from this draft folder (EAGLE layout)")
    p.add_argument("--no-fc-bias", action="store_true", help="new draft without fc bias")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its latest checkpoint (an error when there is none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:

    cfg = TrainConfig(
        data_dir=args.data, out_dir=args.out, mode=args.mode, align_steps=args.align_steps, topk=args.topk,
        topk_w=args.topk_w, v_w=args.v_w, p_w=args.p_w, step_weights=args.step_weights, lr=args.lr,
        weight_decay=args.weight_decay, clip_value=args.clip_value, warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
        max_len=args.max_len, noise_std=args.noise_std, noise_scale_by_length=not args.noise_constant,
        mask_alignment=args.mask_alignment, attention=args.attention, autocast=args.autocast, seed=args.seed,
        eval_fraction=args.eval_fraction, eval_every=args.eval_every, eval_k=args.eval_k,
        eval_max_examples=args.eval_max_examples, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, init_from=args.init_from,
        draft_vocab=args.draft_vocab,
        bias=not args.no_fc_bias, progress=not args.no_progress)
    trainer = Trainer(cfg, target=args.target)
    try:
        final = trainer.train(resume=args.resume)
    except TrainingInterrupted as e:
        if trainer.rank == 0:
            print(f"hass-ext train: {e}", file=sys.stderr)
        code = e.exit_code
    else:
        code = 0
        if trainer.rank == 0:
            if final.get("note"):
                print(f"hass-ext train: {final['note']}", file=sys.stderr)
            print(json.dumps({"out": args.out, "step": trainer.step, "draft": f"{args.out}/draft", **final}))
    if trainer.distributed:

        dist.destroy_process_group()
    return code


def add_token_map_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "token-map", help="hot vocabulary for a draft: the N most frequent assistant tokens of prepared data",
        description="Count the assistant tokens (loss mask 1) of a prepare-data folder and keep the N most frequent, "
                    "plus the target's end-of-turn and chat-template tokens. The draft then drafts from those N "
                    "tokens only (faster draft steps, output unchanged). Writes DRAFT/token_map.pt, which "
                    "load_draft applies and SGLang reads as --speculative-token-map.")
    p.add_argument("--data", required=True, help="prepared data folder (prepare-data output)")
    p.add_argument("--size", type=int, required=True, help="N, the number of tokens kept")
    p.add_argument("--draft", default=None, help="draft checkpoint folder to write token_map.pt into")
    p.add_argument("--out", default=None, help="also (or instead) write the map to this .pt file")
    p.add_argument("--target", default=None,
                   help="model folder or hub id whose special tokens are kept (default: the one in the manifest)")
    p.set_defaults(func=run_token_map)
    return p


def run_token_map(args) -> int:



    if args.draft is None and args.out is None:
        raise ValueError("give --draft DRAFT_DIR and/or --out FILE.pt: where to write the token map")
    manifest = read_manifest(args.data)
    if args.draft is not None:
        cfg_path = os.path.join(args.draft, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{args.draft} is not a draft checkpoint folder ({CONFIG_NAME} is missing)")
        with open(cfg_path, encoding="utf-8") as f:
            draft_vocab = json.load(f).get("vocab_size")
        if manifest.get("vocab_size") is not None and draft_vocab != manifest["vocab_size"]:
            raise ValueError(f"the draft's vocab_size ({draft_vocab}) differs from the data's "
                             f"({manifest['vocab_size']})")
    name = args.target or manifest.get("target")
    target = resolve_target(name, dtype=torch.float32, device="cpu")
    counts = token_frequencies(args.data, vocab_size=int(target.config.vocab_size))
    keep = template_token_ids(target)
    ids = hot_vocabulary(counts, args.size, always=keep)
    total = int(counts.sum())
    coverage = float(counts[ids].sum()) / total if total else 0.0
    written = []
    if args.draft is not None:
        written.append(save_token_map(ids, os.path.join(args.draft, TOKEN_MAP_NAME), counts.numel()))

        stale = os.path.join(args.draft, PROFILE_NAME)
        if os.path.exists(stale):  # measured with the old proposals: rerun hass-ext tree-profile
            os.remove(stale)
            print(f"removed {stale} (measured with another token map): run hass-ext tree-profile again",
                  file=sys.stderr)
    if args.out is not None:
        written.append(save_token_map(ids, args.out, counts.numel()))
    print(json.dumps({"size": int(ids.numel()), "coverage": round(coverage, 6), "assistant_tokens": total,
                      "always_kept": keep, "written": written}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hass_ext.train.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_regenerate_parser(sub)
    add_prepare_data_parser(sub)
    add_train_parser(sub)
    add_token_map_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
