"""Ship the drafts trained by train_drafts.py: bf16 safetensors without the embedding (the target's, copied back on
load), in the EAGLE layout.

    python python/export_drafts.py --runs RUNS                 # RUNS/hass/draft -> hass_ext/drafts/<target>
                                                               # RUNS/eagle/draft -> bench/drafts/eagle-<target>
    python python/export_drafts.py --runs RUNS --mode eagle    # one of them

The HASS draft becomes ``draft="default"`` for the target; the EAGLE draft is kept beside the benchmarks for
comparison. ``hass-ext token-map`` can add a reduced draft vocabulary to either afterwards.
"""
import argparse
import json
import os
import sys

import torch

import hass_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def destination(mode: str, target_name: str) -> str:
    name = os.path.basename(str(target_name).rstrip("/"))
    if mode == "hass":
        return os.path.join(ROOT, "hass_ext", "drafts", name)
    return os.path.join(ROOT, "bench", "drafts", f"{mode}-{name}")


def export(run_dir: str, mode: str, target) -> str:
    src = os.path.join(run_dir, "draft")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src} holds no finished draft: run python/train_drafts.py to the end first")
    draft = hass_ext.load_draft(src, target=target)
    out = hass_ext.save_draft(draft, destination(mode, target.name), dtype=torch.bfloat16, embedding=False)
    print(json.dumps({"mode": mode, "from": src, "to": os.path.relpath(out, ROOT)}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="the --out folder of train_drafts.py")
    ap.add_argument("--mode", choices=["both", "hass", "eagle"], default="both")
    args = ap.parse_args(argv)
    target = hass_ext.load_target(dtype=torch.float32, device="cpu")
    for mode in (["hass", "eagle"] if args.mode == "both" else [args.mode]):
        export(os.path.join(args.runs, mode), mode, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
