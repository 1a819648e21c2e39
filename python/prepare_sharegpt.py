"""Training data for the SmolLM2-135M-Instruct drafts: ShareGPT V3 conversations -> target features -> shards.

    python python/prepare_sharegpt.py --out DATA_DIR             # stage 1 data
    python python/prepare_sharegpt.py --out DATA2_DIR --part 2   # stage 2 data: the next 2,700 records
    python python/prepare_sharegpt.py --out DATA3_DIR --part 3 --conversations ANSWERS.jsonl
                                            # stage 3 data: the target's own answers (regenerate_sharegpt.py)
    python python/prepare_sharegpt.py --out DATA4_DIR --part 4 --conversations ANSWERS4.jsonl   # stage 4 likewise

Runs the embedded target over the first 2,700 records of the bundled ShareGPT V3 file, keeping 512 tokens per
conversation (5 % of the examples are held out for evaluation by the trainer); records without a user/assistant
exchange, with control-token strings, or whose first answer starts after 512 tokens are skipped (the manifest
counts them). Interrupt it at any time and run the same command again to continue; `train_drafts.py` reads
DATA_DIR. The target runs in bf16, as on GPUs. Use --device cuda where a GPU is available.
"""
import argparse
import json
import sys

import torch

from hass_ext.target import load_target
from hass_ext.train import prepare_data

RECIPE = dict(conversations="sharegpt", num_conversations=2700, start=0, seed=None, max_len=512, shard_size=256,
              hidden_dtype="bfloat16")
# part 2: the next 2,700 records, new conversations for the second training stage (train_drafts.py --stage 2)
# parts 3 and 4: every conversation of the self-distillation file written by regenerate_sharegpt.py (--stage 3 / 4)
SELF_DISTILLED = dict(RECIPE, conversations=None, num_conversations=None)
PARTS = {1: dict(RECIPE), 2: dict(RECIPE, start=2700), 3: SELF_DISTILLED, 4: SELF_DISTILLED}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="data folder (outside the repository: about 2 GB)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per target forward")
    ap.add_argument("--stop-after-shards", type=int, default=None,
                    help="stop after writing this many new shards (run again to continue)")
    ap.add_argument("--part", type=int, choices=sorted(PARTS), default=1,
                    help="1: records 0-2699 (first training stage), 2: records 2700-5399 (second stage), "
                         "3, 4: the --conversations file of regenerated answers (third, fourth stage)")
    ap.add_argument("--conversations", default=None, help="parts 3, 4: the JSON Lines file of regenerate_sharegpt.py")
    args = ap.parse_args(argv)
    recipe = dict(PARTS[args.part])
    if (recipe["conversations"] is None) != (args.conversations is not None):
        ap.error("--conversations goes with --part 3 or 4 (and only with them)")
    if args.conversations is not None:
        recipe["conversations"] = args.conversations
    target = load_target(dtype=torch.bfloat16, device=args.device)
    m = prepare_data(target, recipe["conversations"], args.out, max_len=recipe["max_len"],
                     num_conversations=recipe["num_conversations"], start=recipe["start"], seed=recipe["seed"],
                     shard_size=recipe["shard_size"], hidden_dtype=recipe["hidden_dtype"],
                     batch_tokens=args.batch_tokens, stop_after_shards=args.stop_after_shards)
    print(json.dumps({k: m[k] for k in ("complete", "num_examples", "num_tokens", "skipped")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
