"""small_linear vs torch's linear (BLAS) for decode-sized calls on the CPU, weights cold as in a real forward.

A decode step reads every weight once, far more than the caches hold, so each layer's weights come from memory.
The benchmark cycles through the linear layers of a whole model body (SmolLM2-135M: 30 layers x q, k, v, o,
gate, up, down) plus its lm_head, for M = 1 .. 64 rows (a one-token step up to a large tree), timing both
implementations interleaved. Also one Llama-3-8B-shaped layer (hidden 4096, 32/8 heads, MLP 14336), fp32.

The ratio row "M vs 1" says how much a forward over M tokens costs relative to a one-token step: what
speculative decoding pays for verifying M tree tokens. CPU only (GPUs use cuBLAS, which has no small-M problem).
Writes bench/results/small_linear_cpu.{json,md}.
"""
import torch
import torch.nn.functional as F

from common import interleaved, parser, write

from hass_ext import ops


def layer_shapes(hidden, heads, kv_heads, head_dim, inter):
    q, kv = heads * head_dim, kv_heads * head_dim
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


def main():
    args = parser(__doc__).parse_args()  # --device is ignored: this is a CPU benchmark on any machine
    models = {"SmolLM2-135M body": (layer_shapes(576, 9, 3, 64, 1536) * 30, 0),
              "SmolLM2-135M lm_head": ([(49152, 576)], 0),
              "Llama-3-8B layer": (layer_shapes(4096, 32, 8, 128, 14336), 0)}
    rows_list = (1, 2, 4, 8, 16, 32, 64)
    repeats = 7
    if args.quick:
        models = {"tiny body": (layer_shapes(64, 4, 2, 16, 128) * 2, 0)}
        rows_list, repeats = (1, 4), 2
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.inference_mode():
        for name, (shapes, _) in models.items():
            weights = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]
            widths = sorted({k for _, k in shapes})
            base = {}
            for M in rows_list:
                xs = {k: torch.randn(M, k, generator=g) for k in widths}
                t = interleaved({
                    "blas": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                    "small_linear": lambda: [ops.small_linear(xs[w.shape[1]], w) for w in weights],
                }, "cpu", repeats=repeats, warmup=1)
                if M == 1:
                    base = dict(t)
                mb = sum(w.numel() for w in weights) * 4 / 2 ** 20
                out.append({"weights": name, "MiB": round(mb), "rows M": M,
                            "blas ms": t["blas"] * 1e3, "small_linear ms": t["small_linear"] * 1e3,
                            "speedup": t["blas"] / t["small_linear"],
                            "blas M vs 1": t["blas"] / base["blas"],
                            "small_linear M vs 1": t["small_linear"] / base["small_linear"],
                            "small_linear GB/s": mb * 2 ** 20 / t["small_linear"] / 1e9})
    write("small_linear_cpu", out, args.out_dir, quick=args.quick,
          notes=f"float32, {torch.get_num_threads()} threads, weights cold (each layer once per pass), median of "
                f"{repeats} interleaved passes. 'M vs 1': cost of M rows relative to one row (same implementation).",
          config={"rows": list(rows_list)})


if __name__ == "__main__":
    main()
