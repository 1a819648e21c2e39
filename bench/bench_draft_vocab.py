"""Draft step time with the full lm_head vs a hot vocabulary of N tokens (FR-Spec style), and the coverage of N.

Target SmolLM2-135M-Instruct (vocab 49152, hidden 576, fp32) with a random draft (init_draft, weights std 0.05:
peaked like a trained draft, so whole trees go 6 levels deep; the step timings do not depend on the weights). A draft step = what one tree expansion costs: the draft forward over the k = 10 frontier
nodes after a 256-token context, the logits (over N rows or the whole head) and the top-k. "head" times the logits
+ top-k part alone; "tree" times a whole default tree (60 nodes, depth 6, top-k 10). All variants are timed
interleaved in one process. Coverage: the fraction of the assistant tokens (loss mask 1) of a prepare-data folder
(--data) that the N most frequent tokens (plus the chat template's special tokens) cover; without --data it is
not computed and the hot rows are a random subset (the timings do not depend on which rows).
"""
import os

import torch

from common import interleaved, parser, write

import hass_ext
from hass_ext.draft import DraftConfig, DraftModel
from hass_ext.tree import _top_log_probs, draft_tree
from hass_ext.train.token_map import hot_vocabulary, template_token_ids, token_frequencies


def clone_draft(draft: DraftModel, head: torch.Tensor) -> DraftModel:
    d = DraftModel(draft.config)
    d.load_state_dict(draft.state_dict())
    d = d.to(device=head.device, dtype=head.dtype).eval()
    d.set_lm_head(head)
    return d


def main():
    ap = parser(__doc__)
    ap.add_argument("--data", default=None, help="prepare-data folder of the target for the coverage")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    if args.quick:
        config = DraftConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_attention_heads=4)
        base = DraftModel(config).eval()
        head = torch.randn(config.vocab_size, config.hidden_size, device=dev)
        sizes, ctx, repeats, keep, counts = [256, 512], 32, 3, [], None
        name = "tiny (vocab 2048)"
    else:
        target = hass_ext.load_target(dtype=torch.float32 if dev == "cpu" else torch.bfloat16, device=dev)
        base = hass_ext.init_draft(target, initializer_range=0.05)  # peaked: trees go 6 levels deep
        head = target.model.get_output_embeddings().weight
        sizes, ctx, repeats = args.sizes, 256, 30
        keep = template_token_ids(target)
        counts = token_frequencies(args.data, vocab_size=base.config.vocab_size) if args.data else None
        name = os.path.basename(str(target.name))
    V, H, k = base.config.vocab_size, base.config.hidden_size, 10

    drafts = {"full": clone_draft(base, head)}
    coverage = {"full": 1.0 if counts is not None else None}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        d = clone_draft(base, head)
        if counts is not None:
            ids = hot_vocabulary(counts, n, always=keep)
            coverage[f"N={n}"] = float(counts[ids].sum()) / float(counts.sum())
        else:
            ids = torch.randperm(V, generator=g)[:n]
            coverage[f"N={n}"] = None
        d.set_token_map(ids)
        drafts[f"N={n}"] = d

    # a 256-token context in each draft's cache, and one frontier of k nodes
    ctx_ids = torch.randint(0, V, (1, ctx), generator=g).to(dev)
    ctx_feats = torch.randn(1, ctx, H, generator=g).to(device=dev, dtype=head.dtype)
    ids = torch.randint(0, V, (k,), generator=g).to(dev)
    feats = torch.randn(k, H, generator=g).to(device=dev, dtype=head.dtype)
    mask = torch.ones(k, ctx + k, dtype=torch.bool, device=dev)
    mask[:, ctx:] = torch.eye(k, dtype=torch.bool, device=dev)
    pos = torch.full((1, k), ctx, device=dev)
    caches, roots = {}, {}
    with torch.inference_mode():
        for key, d in drafts.items():
            cache = d.new_cache(capacity=ctx + 64)
            roots[key] = d(ctx_ids, ctx_feats, cache=cache)[0, -1]
            cache.length = ctx
            caches[key] = cache

    def step(key):
        d, cache = drafts[key], caches[key]

        def fn():
            with torch.inference_mode():
                out = d(ids[None], feats[None], position_ids=pos, cache=cache, cache_pos=ctx, attn_mask=mask)[0]
                _top_log_probs(d, out, k)
        return fn

    def head_only(key):
        d = drafts[key]

        def fn():
            with torch.inference_mode():
                _top_log_probs(d, feats, k)
        return fn

    def tree(key):
        d, cache = drafts[key], caches[key]

        def fn():
            draft_tree(d, cache, roots[key], 7, 60, 6, k)
        return fn

    t_step = interleaved({key: step(key) for key in drafts}, dev, repeats=repeats)
    t_head = interleaved({key: head_only(key) for key in drafts}, dev, repeats=repeats)
    t_tree = interleaved({key: tree(key) for key in drafts}, dev, repeats=max(3, repeats // 3))
    rows = []
    for key in drafts:
        rows.append({"draft_vocab": key if key != "full" else f"full ({V})",
                     "step_ms": t_step[key] * 1e3, "head_ms": t_head[key] * 1e3, "tree_ms": t_tree[key] * 1e3,
                     "step_speedup": t_step["full"] / t_step[key], "tree_speedup": t_tree["full"] / t_tree[key],
                     "coverage": coverage[key] if coverage[key] is not None else "n/a"})
    threads = torch.get_num_threads()
    note = (f"Target {name}, random draft, {dev}, {threads} thread(s). Step: draft forward over {k} frontier nodes "
            f"after a {ctx}-token context + logits + top-{k}; head: logits + top-{k} of {k} rows; tree: a whole "
            f"default tree (60 nodes, depth 6, top-k 10). Medians, variants timed interleaved in one run"
            f"{' (CPU wall clock: compare ratios)' if dev == 'cpu' else ''}. Coverage: share of the assistant "
            f"tokens of {'the --data folder' if counts is not None else '(no --data given)'} in the hot set "
            f"(top-N by count, the chat template's special tokens always kept).")
    if counts is not None:
        note += f" {int(counts.sum())} assistant tokens counted."
    write("draft_vocab_cpu" if dev == "cpu" else "draft_vocab_cuda", rows, args.out_dir, note, args.quick)


if __name__ == "__main__":
    main()
