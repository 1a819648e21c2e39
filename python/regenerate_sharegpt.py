"""Self-distillation data for the third and fourth training stages: the embedded target's own greedy answers to
the first user turns of ShareGPT records 5400-7399 (stage 3) and 7400-9399 (stage 4), records the earlier stages
did not use.

    python python/regenerate_sharegpt.py --out DATA3/answers.jsonl          # resumable: rerun to continue
    python python/prepare_sharegpt.py --part 3 --conversations DATA3/answers.jsonl --out DATA3/features
    python python/train_drafts.py --stage 3 --data DATA3/features --out RUNS3
    python python/regenerate_sharegpt.py --stage 4 --out DATA4/answers.jsonl
    python python/prepare_sharegpt.py --part 4 --conversations DATA4/answers.jsonl --out DATA4/features
    python python/train_drafts.py --stage 4 --data DATA4/features --out RUNS4

The target runs in fp32 on the CPU, as at decode time there; prompts of at most 512 tokens (chat template
included), identical prompts once, up to 192 answer tokens each; the printed counts say how many records were
answered and why the others were skipped.
"""
import argparse
import json
import sys

import torch

from hass_ext.target import load_target
from hass_ext.train.regenerate import regenerate

RECIPE = dict(conversations="sharegpt", start=5400, num_conversations=2000, max_prompt_tokens=512,
              max_new_tokens=192)
STAGES = {3: RECIPE, 4: dict(RECIPE, start=RECIPE["start"] + RECIPE["num_conversations"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON Lines file of answered conversations")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=48, help="prompts decoded together")
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), default=3, help="the training stage to answer for")
    args = ap.parse_args(argv)
    recipe = STAGES[args.stage]
    dtype = torch.float32 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" else None
    target = load_target(dtype=dtype, device=args.device)
    counts = regenerate(target, recipe["conversations"], args.out, start=recipe["start"],
                        num_conversations=recipe["num_conversations"], max_prompt_tokens=recipe["max_prompt_tokens"],
                        max_new_tokens=recipe["max_new_tokens"], batch_size=args.batch_size)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
