"""Train the HASS draft and the EAGLE baseline draft for SmolLM2-135M-Instruct: same data, seed and steps.

    python python/prepare_sharegpt.py --out DATA            # once (resumable)
    python python/train_drafts.py --data DATA --out RUNS    # HASS, then EAGLE (resumable)
    python python/train_drafts.py --data DATA --out RUNS --mode eagle
    python python/train_drafts.py --stage 2 --data DATA2 --out RUNS2   # continue both on new conversations
    python python/train_drafts.py --stage 3 --data DATA3 --out RUNS3   # continue both on the target's own answers
    python python/train_drafts.py --stage 4 --data DATA4 --out RUNS4   # ... and on its answers to further prompts

Writes RUNS/hass and RUNS/eagle, each with log.jsonl (losses, held-out k-step acceptance), checkpoints/ and the
final draft/ (EAGLE layout: load it with hass_ext.load_draft). A run checkpoints every `save_every` steps and when
stopped by Ctrl-C or SIGTERM; starting the same command again continues from the latest checkpoint, bit for bit.

Stage 2 continues each stage-1 draft for one pass over 2,700 further ShareGPT records (prepare_sharegpt.py
--part 2) at a lower learning rate: again the same data, steps and seed for both. It starts from the drafts in
hass_ext/drafts/SmolLM2-135M-Instruct (HASS) and bench/drafts/eagle-SmolLM2-135M-Instruct (EAGLE); the shipped
ones are now the stage-2 results, so to rerun stage 2 put the stage-1 exports back there first (git history:
`git checkout e9752c1 -- hass_ext/drafts bench/drafts`).

Stage 3 (self-distillation) continues each stage-2 draft for two passes over the target's own greedy answers to
further ShareGPT prompts (regenerate_sharegpt.py, prepare_sharegpt.py --part 3): at decode time the draft reads
the target's text, not the dataset's. Same data, steps and seed for both; the hot vocabulary is recounted on these
answers. The stage-2 drafts to start it from: `git checkout 90bf393 -- hass_ext/drafts bench/drafts`.
Stage 4 repeats stage 3 on the answers to the next ShareGPT prompts (regenerate_sharegpt.py --stage 4), starting
from the stage-3 drafts (`git checkout ed068ad -- hass_ext/drafts bench/drafts`).
The HASS variants (--hass-step-weights, --hass-attention, --hass-topk-w, --hass-align-steps) rerun a stage with
one setting changed; their results are in bench/results/draft_tau_variants.md and draft_training_variants.md, the
shipped runs' in bench/results/draft_training.md.

The two runs differ only in the method: HASS = 3 harmonized-context-alignment steps + top-K loss (K=10,
weight 1), EAGLE = 1 step, no top-K loss. Both use the reference's loss weights (feature 1, soft CE 0.1),
AdamW (0.9, 0.95, wd 0.01), clip-by-value 0.5, warmup + linear decay and feature noise. The learning rate is
higher than the reference's 3e-5 because the budget is two passes over a few thousand conversations, not 40
passes over 68k. Both distil over the 8192 most frequent assistant tokens (draft_vocab, EAGLE-3 style): the
vocabulary their trees draft from on a CPU (bench/results/draft_vocab_cpu.md).
bf16 autocast (fp32 master weights) as on GPUs; on CPUs with AMX it is also faster than fp32 there.
With several processes (torchrun --nproc_per_node N python/train_drafts.py ...) the global batch is N times
larger and the number of steps N times smaller.
"""
import argparse
import json
import os
import sys

from hass_ext.train import TrainConfig, Trainer
from hass_ext.train.align import ATTENTION_MODES

RECIPE = dict(batch_size=4, epochs=2, lr=5e-4, draft_vocab=8192, warmup_ratio=0.02, seed=0, max_len=512, noise_std=0.2,
              autocast="bf16", eval_fraction=0.05, eval_k=5, eval_every=250, eval_max_examples=48, save_every=50,
              keep_checkpoints=2, log_every=5)


STAGES = {1: RECIPE, 2: dict(RECIPE, epochs=1, lr=2e-4), 3: dict(RECIPE, epochs=2, lr=2e-4),
          4: dict(RECIPE, epochs=2, lr=2e-4)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the previous stage's drafts, where the shipped ones live
SHIPPED_DRAFTS = {"hass": os.path.join(ROOT, "hass_ext", "drafts", "SmolLM2-135M-Instruct"),
                 "eagle": os.path.join(ROOT, "bench", "drafts", "eagle-SmolLM2-135M-Instruct")}


def run(mode: str, data: str, out: str, stage: int = 1, init_from=None, **variant) -> dict:
    """``variant``: TrainConfig fields that differ from the stage's recipe (None = the recipe's)."""
    recipe = STAGES[stage] if stage == 1 else dict(STAGES[stage], init_from=init_from or SHIPPED_DRAFTS[mode])
    recipe = dict(recipe, **{k: v for k, v in variant.items() if v is not None})
    cfg = TrainConfig(data_dir=data, out_dir=os.path.join(out, mode), mode=mode, **recipe)
    trainer = Trainer(cfg)  # the target named in the data manifest (the embedded SmolLM2-135M-Instruct)
    final = trainer.train(resume="auto")  # continue the run in out_dir if there is one
    if trainer.rank == 0:
        print(json.dumps({"mode": mode, "steps": trainer.step, **final}), flush=True)
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by prepare_sharegpt.py")
    ap.add_argument("--out", required=True, help="runs folder (RUNS/hass, RUNS/eagle)")
    ap.add_argument("--mode", choices=["both", "hass", "eagle"], default="both")
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), default=1,
                    help="1: train from scratch; 2: continue the stage-1 drafts on the --part 2 data; "
                         "3: continue the stage-2 drafts on the --part 3 (self-distilled) data; "
                         "4: continue the stage-3 drafts on the --part 4 data")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="stages 2-4: the draft to continue (default: the shipped one of that mode)")
    hass = ap.add_argument_group("HASS variants (the EAGLE run ignores them)")
    hass.add_argument("--hass-step-weights", type=float, nargs=3, default=None, metavar="W",
                      help="loss weight of each of HASS's 3 alignment steps (default 1 1 1)")
    hass.add_argument("--hass-attention", choices=ATTENTION_MODES, default=None,
                      help="reference = the reference code's leaky softmax in the alignment steps")
    hass.add_argument("--hass-topk-w", type=float, default=None, metavar="W",
                      help="weight of the top-K loss (default 1; the reference's stage 1 uses 0)")
    hass.add_argument("--hass-align-steps", type=int, default=None, metavar="J",
                      help="harmonized context alignment steps (default 3; 1 = EAGLE's training plus the top-K loss)")
    args = ap.parse_args(argv)
    modes = ["hass", "eagle"] if args.mode == "both" else [args.mode]
    if args.init_from is not None and (len(modes) > 1 or args.stage == 1):
        ap.error("--init-from names the one draft a later stage continues: pass --stage 2-4 and --mode hass or "
                 "--mode eagle with it")
    for mode in modes:
        variant = {}
        if mode == "hass":
            variant = dict(attention=args.hass_attention, topk_w=args.hass_topk_w, align_steps=args.hass_align_steps,
                           step_weights=args.hass_step_weights and list(args.hass_step_weights))
        run(mode, args.data, args.out, args.stage, args.init_from, **variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
