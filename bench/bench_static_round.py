"""Fixed-shape rounds (hass_ext.static_rounds) against the eager loop's round and a vanilla step, and on CUDA the
same round replayed from a CUDA graph (and a vanilla step replayed from one, the fair unit for it).

Random-weight Llama target with hass_tree attention, random draft, after a prefill of --context tokens; every
timed call starts from the same state (restored untimed). Rows, in vanilla steps (eager):
  vanilla step         decode_step: the target over one token with its KV cache
  vanilla step (graph) the same step replayed from a CUDA graph                                     (CUDA only)
  eager round          hass_ext.speculative.speculative_round (the loop on the CPU)
  static round         StaticRounds.round, eager
  static round (graph) StaticRounds.round replayed from a CUDA graph                                (CUDA only)
  overhead (graph)     static round (graph) minus the target's tree forward alone (graph-replayed): the draft
                       tree, verify_tree, both compactions and the draft's context pass            (CUDA only)
Checks: every kind of round commits the same tokens, which are greedy vanilla decoding's.

    python bench/bench_static_round.py --device cuda --shape llama3-8b --tree 60/6/10
    python bench/bench_static_round.py --tiny          # seconds on a CPU
Writes bench/results/static_round_<device>[-ctx<N>][-tree<T>_<D>_<K>].json/.md.
"""
import sys

import torch

from bench_round import Bench, add_model_args, build, middle_mean, model_settings, parse_tree, set_attention
from common import interleaved, parser, write

from hass_ext.batch import forward_rows  # noqa: E402
from hass_ext.speculative import Sampling  # noqa: E402
from hass_ext.static_rounds import StaticRounds  # noqa: E402
from hass_ext.tree import draft_trees  # noqa: E402


class Static:
    """StaticRounds after the prefill, with its start state saved for restores."""

    def __init__(self, bench: Bench, tree: dict):
        target, draft = bench.target, bench.draft
        s = bench.state
        ids = torch.randint(0, target.config.vocab_size, (1, s.length), generator=torch.Generator().manual_seed(1))
        ids = ids.to(bench.dev)
        room = s.length + 64
        with torch.inference_mode():
            pre = target.prefill(ids, past_key_values=target.new_cache(room + tree["total_tokens"]))
            self.r = StaticRounds(target, draft, [ids], [s.root], (pre.past_key_values, [pre.hidden_states[0]]),
                                  Sampling(0.0, 1.0, 0, None), [None], room, **tree)
        r = self.r
        self.start = (r.lengths.clone(), r.roots.clone(), r.root_hidden.clone())

    @torch.inference_mode()
    def restore(self):
        for dst, src in zip((self.r.lengths, self.r.roots, self.r.root_hidden), self.start):
            dst.copy_(src)

    def round(self):
        self.r.round()

    def tokens(self) -> list:
        return self.r.read()[0]

    @torch.inference_mode()
    def tree_forward(self):
        """The target's forward over this round's tree alone (the draft tree built once, outside)."""
        r = self.r
        forward_rows(r.target, r.cache, self._tree.tokens, r.lengths[:, None] + self._tree.depths, self._tree.mask,
                     r.lengths, ragged=True)
        r.cache.truncate(r.room)

    def build_tree(self):
        r = self.r
        r.dcache.length = r.room + r.width
        with torch.inference_mode():
            self._tree = draft_trees(r.draft, r.dcache, r.root_hidden, r.roots, r.lengths, r.n, r.depth, r.k,
                                     early_stop=False)


def graph_of(fn, setup):
    """fn captured in a CUDA graph after one warm-up call on a side stream (setup before each)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        setup()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main():
    ap = parser(__doc__.split("\n")[0])
    add_model_args(ap)
    args = ap.parse_args()
    dev, dtype = model_settings(args)
    cuda = dev.type == "cuda"
    repeats = args.repeats or (10 if args.tiny else 20)
    torch.set_grad_enabled(False)

    target, draft, shape = build(args, dev, dtype)
    set_attention(target, "hass_tree")
    tree = parse_tree(ap, args.tree)
    b = Bench(target, draft, args.context, tree, dev)
    s = Static(b, tree)

    # every kind of round commits the same tokens, greedy decoding's
    b.restore()
    want = b.round()
    s.restore()
    s.round()
    got = {"eager round": want, "static round": s.tokens()}
    fns = {"vanilla step": b.vanilla, "eager round": b.round, "static round": s.round}
    setups = {"vanilla step": b.restore, "eager round": b.restore, "static round": s.restore}
    if cuda:
        rg = graph_of(s.round, s.restore)
        s.restore()
        rg.replay()
        got["static round (graph)"] = s.tokens()
        vg = graph_of(b.vanilla, b.restore)
        s.restore()
        s.build_tree()
        fg = graph_of(s.tree_forward, lambda: None)
        fns.update({"vanilla step (graph)": vg.replay, "static round (graph)": rg.replay, "tree forward (graph)":
                    fg.replay})
        setups.update({"vanilla step (graph)": b.restore, "static round (graph)": s.restore,
                       "tree forward (graph)": lambda: None})
    greedy = b.greedy_continuation(len(want))
    same = all(v == want for v in got.values()) and want == greedy

    def setup_all():
        b.restore()
        s.restore()

    t = interleaved(fns, dev, repeats=repeats, warmup=2, setup=setup_all, stat=middle_mean)
    unit, scale = ("us", 1e6) if cuda or args.tiny else ("ms", 1e3)
    step = t["vanilla step"]
    rows = [{"kind": k, unit: v * scale, "x_vanilla_step": v / step} for k, v in t.items()
            if k != "tree forward (graph)"]
    summary = {k: v for k, v in t.items()}
    if cuda:
        overhead = t["static round (graph)"] - t["tree forward (graph)"]
        rows.append({"kind": "overhead (graph): round - tree forward", unit: overhead * scale,
                     "x_vanilla_step": overhead / step})
        summary["overhead_graph_s"] = overhead
    summary.update(tokens_per_round=len(want), all_rounds_match_greedy=same)
    config = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "attention": "hass_tree",
              "dtype": str(dtype).replace("torch.", ""), "shape": "tiny" if args.tiny else args.shape, **shape,
              "context": args.context, **tree, "repeats": repeats}
    notes = (f"Tree {tree['total_tokens']}/{tree['depth']}/{tree['tree_topk']} after a {args.context}-token context, "
             f"hass_tree attention, random weights ({len(want)} token(s) committed per round). "
             + ("CUDA events: absolute times." if cuda else "CPU wall clock, timed interleaved: the ratios count.")
             + " Means over the middle half of the repetitions.")
    name = "static_round_" + (config["device"].replace(" ", "_") if cuda else "cpu")
    if args.context != (64 if args.tiny else 1024):
        name += f"-ctx{args.context}"
    if (tree["total_tokens"], tree["depth"], tree["tree_topk"]) != (60, 6, 10):
        name += "-tree{total_tokens}_{depth}_{tree_topk}".format(**tree)
    write(name, rows, args.out_dir, notes, args.quick or args.tiny, config, {"summary": summary})
    if not same:
        message = f"rounds disagree or differ from greedy decoding: {got}, greedy {greedy}"
        if dtype == torch.float32:
            raise SystemExit(message)
        print("warning:", message, file=sys.stderr)


if __name__ == "__main__":
    main()
