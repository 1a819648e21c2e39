"""One full speculative round against one vanilla decode step, on a random-weight Llama target with a random draft.

After a prefill of --context tokens, times interleaved (each call from the same restored state):
  vanilla   one decode step: the target over one token with the KV cache, then the next token (greedy);
  round     hass_ext.speculative.speculative_round with the default EAGLE-2 tree (60 nodes, depth 6, top-k 10),
            broken into its steps: draft_tree (tree expansion), verify_forward (target over the tree tokens with
            the tree mask, lm_head included), verify_tree (hass_ext.ops.verify_tree), compact_kv (the target cache,
            hass_ext.ops.compact_kv), draft_extend (the draft's context pass over the accepted tokens: this is how
            the draft cache is brought up to date, nothing of it is compacted) and rest (the remainder).
break-even tau = round / vanilla step: the tokens a round must yield to match vanilla decoding.

Random weights accept almost nothing, so the round here moves few cache entries; the costs barely depend on it.
GPU (CUDA events): absolute times. CPU: absolute times are noisy on a shared machine, the ratios are what counts.

The target's attention is each of --attn in turn (default both, on the same weights and prefill):
  hass_tree  hass_ext's tree-attention kernel takes the ancestor mask (hass_ext.register_hass_tree)
  sdpa       transformers' sdpa attention with the 4D float tree mask (repeat_kv + masked SDPA)

    python bench/bench_round.py --shape llama3-8b           # the GPU shape (bf16)
    python bench/bench_round.py --tiny                      # seconds on a CPU (= --quick)
    python bench/bench_round.py --shape smollm2-135m --layers 2 --context 512 --attn hass_tree
Writes bench/results/round_<device>_<attn>.json and .md per attention (round_<device>_<attn>-quick with --tiny;
-ctx<N> / -tree<T>_<D>_<K> added for a context or tree other than the default).
"""
import os
import statistics
import sys

import torch

from common import interleaved, parser, peak_memory, write

# the random Llama targets of the tests (any shape: tests/tiny_models.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tiny_models import tiny_target  # noqa: E402

import hass_ext  # noqa: E402
from hass_ext.draft_io import resolve_draft  # noqa: E402
from hass_ext.sampling import sample_token  # noqa: E402
from hass_ext.speculative import (DEFAULT_DEPTH, DEFAULT_TOTAL_TOKENS, DEFAULT_TREE_TOPK, Sampling,  # noqa: E402
                                  check_target, decode_step, initial_state, speculative_round)
from hass_ext.timing import PhaseTimer  # noqa: E402
from hass_ext.tree import check_tree_options  # noqa: E402

ATTENTIONS = ("hass_tree", "sdpa")

SHAPES = {
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate_size=14336, vocab=128256,
                      rope_theta=500000.0),
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate_size=1536, vocab=49152,
                         rope_theta=100000.0),
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate_size=256, vocab=1000),
}
# speculative_round's step names -> the names reported
PHASES = {"draft": "draft_tree", "verify": "verify_forward", "accept": "verify_tree", "compact": "compact_kv",
          "extend": "draft_extend"}
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, generator=None)


def middle_mean(samples: list) -> float:
    """The mean of the middle half of the samples: robust to a busy machine's outliers, and additive (the means of
    a round's steps sum to the mean round where medians would not)."""
    v = sorted(samples)
    return statistics.fmean(v[len(v) // 4: len(v) - len(v) // 4])


def build(args, dev, dtype):
    shape = dict(SHAPES["tiny" if args.tiny else args.shape])
    if args.layers:
        shape["layers"] = args.layers
    if args.vocab:
        shape["vocab"] = args.vocab
    with torch.device(dev):  # random init straight on the device (an 8B model is slow to initialise on a CPU)
        target = tiny_target("llama", seed=0, dtype=dtype, max_pos=max(2048, args.context + 256), **shape)
    target.model.to(dev)
    target.name = f"random-{'tiny' if args.tiny else args.shape}"
    draft = resolve_draft(hass_ext.init_draft(target, seed=0), target)
    return target, draft, shape


def set_attention(target, attn: str):
    """Switch the target's transformers attention implementation (the model config and each layer's)."""
    if attn == "hass_tree":
        hass_ext.register_hass_tree()
    target.model.config._attn_implementation = attn
    for layer in target.model.model.layers:
        layer.self_attn.config._attn_implementation = attn


class Bench:
    """The target and draft after a prefill, and the state every timed call starts from."""

    def __init__(self, target, draft, context: int, tree: dict, dev):
        self.target, self.draft, self.tree, self.dev = target, draft, tree, dev
        check_target(target, context + tree["total_tokens"] + 8)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, target.config.vocab_size, (1, context), generator=g).to(dev)
        self.state = initial_state(target, draft, ids, GREEDY)
        s = self.state
        self.start = (s.length, s.root, s.root_hidden)
        self.root = torch.tensor([s.root], device=dev)
        self.rounds = []  # (PhaseTimer, new tokens) per round call

    def restore(self):
        """Put both caches and the state back to right after the prefill (entries past ``length`` are garbage
        that the next forward overwrites or drops, as between rounds)."""
        s = self.state
        length, s.root, s.root_hidden = self.start
        extra = s.cache.get_seq_length() - length
        if extra:
            s.cache.crop(-extra)
        s.length = s.draft_cache.length = length

    def vanilla(self):
        logits = decode_step(self.target, self.root, self.state.cache)
        return int(sample_token(logits, 0.0)[0])

    def round(self):
        timer = PhaseTimer(self.dev)
        with timer("round"):
            new_tokens, _ = speculative_round(self.target, self.draft, self.state, GREEDY, phase=timer, **self.tree)
        self.rounds.append((timer, new_tokens))
        return new_tokens

    def greedy_continuation(self, n: int) -> list:
        """The first n tokens vanilla greedy decoding commits after the root."""
        self.restore()
        tokens, tok = [], self.root
        for _ in range(n):
            tok = sample_token(decode_step(self.target, tok, self.state.cache), 0.0)
            tokens.append(int(tok[0]))
        return tokens


def main():
    ap = parser(__doc__)
    add_model_args(ap)
    ap.add_argument("--attn", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS),
                    help="target attention implementations to time, each in turn (default both)")
    args = ap.parse_args()
    dev, dtype = model_settings(args)
    cuda = dev.type == "cuda"
    repeats = args.repeats or (10 if args.tiny else 30 if cuda else 10)
    torch.set_grad_enabled(False)

    target, draft, shape = build(args, dev, dtype)
    tree = parse_tree(ap, args.tree)
    b = Bench(target, draft, args.context, tree, dev)

    failures = []
    for attn in args.attn:
        set_attention(target, attn)
        failures += measure(b, args, attn, dev, dtype, shape, tree, repeats)
    if failures:
        message = "; ".join(failures)
        if dtype == torch.float32:
            raise SystemExit(message)
        # in 16-bit a random model's near-tied logits can flip between the tree forward and single steps
        print("warning:", message, file=sys.stderr)


def add_model_args(ap) -> None:
    """The target shape, context, dtype, repeats and tree options of the round benchmarks."""
    ap.add_argument("--tiny", action="store_true", help="tiny Llama (2 layers, hidden 128, vocab 1000), context 64, "
                                                        "fp32: seconds on a CPU (--quick implies it)")
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default=None,
                    help="target shape (default llama3-8b on CUDA, smollm2-135m on the CPU)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of target layers")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--context", type=int, default=None, help="prefilled tokens (default 1024; 64 with --tiny)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tree", default=f"{DEFAULT_TOTAL_TOKENS}/{DEFAULT_DEPTH}/{DEFAULT_TREE_TOPK}",
                    help="the tree as TOTAL_TOKENS/DEPTH/TOPK (default %(default)s, EAGLE-2's)")


def model_settings(args):
    """Fill in the defaults of add_model_args' options for the device; returns (device, dtype)."""
    args.tiny = args.tiny or args.quick
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    args.shape = args.shape or ("llama3-8b" if cuda else "smollm2-135m")
    args.context = args.context or (64 if args.tiny else 1024)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda and not args.tiny else torch.float32)
    return dev, dtype


def parse_tree(ap, text: str) -> dict:
    """TOTAL_TOKENS/DEPTH/TOPK -> the tree options; a parser error naming --tree otherwise."""
    try:
        total, depth, topk = (int(x) for x in text.split("/"))
        check_tree_options(total, depth, topk)
    except ValueError as e:
        ap.error(f"--tree must be TOTAL_TOKENS/DEPTH/TOPK of ints >= 1 with TOPK <= TOTAL_TOKENS, got {text!r}"
                 f" ({e})")
    return dict(total_tokens=total, depth=depth, tree_topk=topk)


def measure(b, args, attn, dev, dtype, shape, tree, repeats) -> list:
    """Times vanilla steps and rounds with the target's current attention; writes the results; returns the
    failed losslessness checks (empty when the timed rounds are greedy decoding's)."""
    cuda = dev.type == "cuda"
    # Losslessness of the timed round: its tokens are what greedy vanilla decoding would commit.
    b.restore()
    first = b.round()
    matches_greedy = first == b.greedy_continuation(len(first))

    b.rounds.clear()
    t = interleaved({"vanilla": b.vanilla, "round": b.round}, dev, repeats=repeats, warmup=2, setup=b.restore,
                    stat=middle_mean)
    same_tokens = all(tokens == first for _, tokens in b.rounds)
    # The breakdown: each step averaged over the timed rounds whose time lies in the middle half (means add up,
    # so the steps and rest sum to the total exactly; the middle half drops rounds hit by a busy machine).
    timed = sorted((timer.seconds() for timer, _ in b.rounds[-repeats:]), key=lambda sec: sec["round"])
    middle = timed[len(timed) // 4: len(timed) - len(timed) // 4]
    phases = {PHASES[k]: statistics.fmean(sec[k] for sec in middle) for k in PHASES}
    total = statistics.fmean(sec["round"] for sec in middle)
    phases["rest"] = total - sum(phases.values())

    b.restore()
    mem_vanilla = peak_memory(b.vanilla, dev)
    b.restore()
    mem_round = peak_memory(b.round, dev)
    b.restore()

    unit, scale = ("us", 1e6) if cuda or args.tiny else ("ms", 1e3)
    rows = [{"step": "vanilla decode step", unit: t["vanilla"] * scale, "x_vanilla_step": 1.0, "share_of_round": "",
             "peak_mem_MiB": mem_vanilla / 2**20}]
    for name, s in phases.items():
        rows.append({"step": f"round: {name}", unit: s * scale, "x_vanilla_step": s / t["vanilla"],
                     "share_of_round": f"{100 * s / total:.1f}%", "peak_mem_MiB": ""})
    rows.append({"step": "round: total", unit: total * scale, "x_vanilla_step": total / t["vanilla"],
                 "share_of_round": "100%", "peak_mem_MiB": mem_round / 2**20})
    config = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "attention": attn,
              "dtype": str(dtype).replace("torch.", ""),
              "shape": "tiny" if args.tiny else args.shape, **shape, "context": args.context, **tree,
              "repeats": repeats}
    summary = {"vanilla_step_s": t["vanilla"], "round_s": total, "phases_s": phases,
               "break_even_tau": total / t["vanilla"], "tokens_per_round": len(first),
               "accepted_draft_tokens": len(first) - 1, "round_matches_greedy": matches_greedy,
               "rounds_identical": same_tokens}
    timing = ("CUDA events: absolute times." if cuda else
              "CPU wall clock, vanilla steps and rounds timed interleaved in one run: on a shared CPU the ratios "
              "(x_vanilla_step, break-even tau) are what counts, absolute times are indicative only.")
    notes = (f"Target attention {attn}. One speculative round (tree {tree['total_tokens']} nodes, depth {tree['depth']}, top-k "
             f"{tree['tree_topk']}) vs one vanilla decode step after a {args.context}-token context. "
             f"Break-even tau = round / step = {total / t['vanilla']:.2f}: a round must commit that many tokens "
             f"to match vanilla decoding ({len(first)} committed here: random weights). {timing} Times are means "
             f"over the middle half of {repeats} repetitions; rest = the round minus its steps.")
    name = "round_" + (config["device"].replace(" ", "_") if cuda else "cpu") + "_" + attn
    if args.context != (64 if args.tiny else 1024):  # runs at other contexts and trees beside the default one
        name += f"-ctx{args.context}"
    if (tree["total_tokens"], tree["depth"], tree["tree_topk"]) != (DEFAULT_TOTAL_TOKENS, DEFAULT_DEPTH,
                                                                     DEFAULT_TREE_TOPK):
        name += f"-tree{tree['total_tokens']}_{tree['depth']}_{tree['tree_topk']}"
    write(name, rows, args.out_dir, notes, args.quick or args.tiny, config, {"summary": summary})
    if matches_greedy and same_tokens:
        return []
    return [f"{attn}: the timed round did not reproduce greedy decoding (summary: round_matches_greedy, "
            f"rounds_identical)"]




if __name__ == "__main__":
    main()
