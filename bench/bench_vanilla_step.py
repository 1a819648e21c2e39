"""A vanilla decode step on the row-invariant kernels vs the path it replaced, side by side in one run.

The decode loop runs its vanilla steps on the kernels of a tree verification (the tree-attention kernel over a
one-node tree, small_linear layers in every dtype) so that a tree node's logits are bit-identical to a step's. This
measures what that costs against the previous vanilla step: transformers' sdpa attention, with small_linear
layers for float32 and torch's linear (BLAS) for bfloat16/float16. Both steps run on the same loaded target,
alternately, after a context of C cached tokens (one step, then the cache cropped back).

    python bench/bench_vanilla_step.py                # float32, bfloat16, float16; contexts 128 and 512
    python bench/bench_vanilla_step.py --quick
Writes bench/results/vanilla_step_<device>.json and .md.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, parser, write  # noqa: E402

import hass_ext  # noqa: E402
from hass_ext.ops.small_linear import use_blas_linear, use_small_linear  # noqa: E402
from hass_ext.speculative import decode_step  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = (16,) if args.quick else (128, 512)
    repeats = 3 if args.quick else args.repeats
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        target = hass_ext.load_target(dtype=dtype, device="cpu")
        model = target.model
        g = torch.Generator().manual_seed(0)
        for C in contexts:
            ids = torch.randint(0, target.config.vocab_size, (1, C), generator=g)
            cache = target.prefill(ids).past_key_values
            token = torch.tensor([42])

            def new_step():
                decode_step(target, token, cache)
                cache.crop(-1)

            def old_step():  # sdpa; float32 kept small_linear before, 16-bit dtypes BLAS
                if dtype != torch.float32:
                    use_blas_linear(model)
                try:
                    with torch.inference_mode():
                        model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
                finally:
                    use_small_linear(model)
                cache.crop(-1)

            t = interleaved({"old": old_step, "new": new_step}, "cpu", repeats=repeats, warmup=2)
            rows.append({"dtype": name, "context": C, "previous step ms": 1e3 * t["old"],
                         "row-invariant step ms": 1e3 * t["new"], "new / previous": t["new"] / t["old"]})
            print(rows[-1], flush=True)
    notes = ("Median per step, interleaved. previous: sdpa attention, small_linear (float32) or torch's linear "
             "(16-bit); row-invariant: decode_step (tree-attention kernel over a one-node tree, small_linear).")
    write("vanilla_step_cpu", rows, args.out_dir, notes=notes, quick=args.quick,
          config={"threads": torch.get_num_threads(), "target": "SmolLM2-135M-Instruct"})


if __name__ == "__main__":
    main()
