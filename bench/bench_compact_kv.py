"""compact_kv (one call over all layers) vs the per-layer gather/copy oracle.

Shapes: SmolLM2-135M (30 layers, 3 KV heads, d 64) and Llama-3-8B (32 layers, 8 KV heads, d 128), K and V
caches, 7 accepted entries moved after a round. CPU: ratios; GPU: absolute microseconds.
"""
import torch

from common import interleaved, parser, write

from hass_ext import ops
from hass_ext.oracles import compact_kv_oracle


def main():
    args = parser(__doc__).parse_args()
    dev = args.device
    shapes = [("SmolLM2-135M", 30, 3, 64, 1024), ("Llama-3-8B", 32, 8, 128, 4096)]
    if args.quick:
        shapes = [("tiny", 2, 2, 16, 64)]
    rows = []
    for name, layers, heads, d, S in shapes:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        stacked = torch.randn(2 * layers, 1, heads, S, d, dtype=dtype, device=dev)
        per_layer = list(stacked.unbind(0))
        prefix = S // 2
        src = torch.tensor([[prefix + i * 3 for i in range(7)]], device=dev)
        dst = torch.tensor([prefix], device=dev)
        t = interleaved({
            "op_stacked": lambda: ops.compact_kv(stacked, src, dst),
            "op_list": lambda: ops.compact_kv(per_layer, src, dst),
            "oracle": lambda: compact_kv_oracle(per_layer, src, dst),
        }, dev, repeats=5 if args.quick else 30)
        rows.append({"shape": name, "layers": layers, "kv_heads": heads, "head_dim": d, "moved": 7,
                     "op_stacked_us": t["op_stacked"] * 1e6, "op_list_us": t["op_list"] * 1e6,
                     "oracle_us": t["oracle"] * 1e6, "speedup_vs_oracle": t["oracle"] / t["op_stacked"]})
    note = ("CPU wall-clock medians, timed interleaved in one run: compare ratios only." if dev == "cpu" else
            "CUDA event medians.")
    write("compact_kv" if dev == "cpu" else f"compact_kv_{dev}", rows, args.out_dir, note, args.quick)


if __name__ == "__main__":
    main()
