"""Batched decode loops: several prompts per call, each row lossless on its own.

Layout. The target cache is one SlotCache ``[2 * layers, B, Hkv, capacity, d]`` with the rows left-aligned: row b
holds its committed positions in slots ``[0, lengths[b])``. The cache's common length is the longest row's,
``P = max(lengths)``; a forward writes its new entries at ``[P, P + n)`` for every row, and every attention layer
sees row b's prefix ``[0, lengths[b])`` only (tree attention's ``prefix_lens``; an additive mask for eager/sdpa
targets), then the row's own tree. After verification ``compact_kv`` moves each row's accepted entries to
``lengths[b] ...`` for all layers in one call. The draft cache has the same layout, with the same lengths.

Row invariance. Every op of the target's decode path computes a row alone (row-invariant linear layers,
tree attention over a row's visible keys in rank order, per-row norms and RoPE), so row b's logits are bit for bit
those of the same prompt decoded alone: greedy rows are token-identical to ``generate(prompt, draft=None)``.
Each prompt is prefilled alone (the prefill is the model's own fast path, as for one prompt) into its row.

Rows that finish (end of turn, their max_new_tokens) leave the batch at the end of the round: their rows of both
caches are dropped by moving the others to the front of the same storage, so they cost nothing afterwards.

Sampling: each row has its own ``torch.Generator``; its first token is drawn as a lone run draws it, and
verification takes per-row uniforms from the row's generator (``verify_tree(uniforms=...)``).

The decoders yield ``Event``s: a row's new tokens (cut at its end of turn or max_new_tokens), the accepted draft
tokens of the round (None for the first token and vanilla steps), and why the row stopped (None while it runs).
"""
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from . import ops
from .draft import DraftModel, context_pass
from .ops.small_linear import row_invariant
from .sampling import sample_token
from .speculative import TREE_ATTENTION, Sampling, _attention_impl, check_target
from .timing import median_times
from .tree import Tree, check_tree_options, draft_trees


@dataclass
class Event:
    row: int                      # index of the prompt in the caller's list
    tokens: List[int]             # new tokens of this row (cut after EOS / at max_new_tokens)
    accepted: Optional[int]       # accepted draft tokens of the round, None outside verification rounds
    stop: Optional[str] = None    # "eos" or "length" once the row is done, else None


class _Rows:
    """Host-side bookkeeping of the rows still in the batch (in cache order)."""

    def __init__(self, max_new: Sequence[int], generators, eos):
        self.ids = list(range(len(max_new)))  # caller's row index of each cache row
        self.max_new = list(max_new)
        self.generators = list(generators)
        self.produced = [0] * len(max_new)
        self.eos = eos

    def commit(self, b: int, tokens: List[int]):
        """Cut a cache row's new tokens at EOS / max_new_tokens; return (tokens kept, stop reason or None)."""
        room = self.max_new[b] - self.produced[b]
        kept, stop = [], None
        for t in tokens[:room]:
            kept.append(t)
            if t in self.eos:
                stop = "eos"
                break
        self.produced[b] += len(kept)
        if stop is None and self.produced[b] >= self.max_new[b]:
            stop = "length"
        return kept, stop

    def keep(self, rows: List[int]) -> None:
        for name in ("ids", "max_new", "generators", "produced"):
            setattr(self, name, [getattr(self, name)[b] for b in rows])


def _prefill_rows(target, prompts: Sequence[torch.Tensor], capacity: int):
    """Prefill every prompt alone; returns the batch cache holding row b's prompt in ``[0, len_b)``, the last
    logits ``[B, V]`` and each row's final-norm features ``[len_b, H]``."""
    cache = target.new_cache(capacity)
    buffer, logits, feats = None, [], []
    for b, ids in enumerate(prompts):
        pre = target.prefill(ids, past_key_values=target.new_cache(ids.shape[1]))
        row = pre.past_key_values.buffer  # [2 * layers, 1, Hkv, len_b, d]
        if buffer is None:
            shape = (row.shape[0], len(prompts), row.shape[2], capacity, row.shape[4])
            buffer = torch.zeros(shape, dtype=row.dtype, device=row.device)
        buffer[:, b, :, :ids.shape[1]] = row[:, 0]
        logits.append(pre.logits[:, -1])
        feats.append(pre.hidden_states[0])
    cache.adopt(buffer, max(ids.shape[1] for ids in prompts))
    return cache, torch.cat(logits), feats


def _sample_rows(logits: torch.Tensor, sampling: Sampling, generators) -> List[int]:
    """Each row's token from its logits, drawn with its own generator as a lone run draws it."""
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    return [int(sample_token(logits[b:b + 1], sampling.temperature, sampling.top_p, sampling.top_k, g)[0])
            for b, g in enumerate(generators)]


@torch.inference_mode()
def forward_rows(target, cache, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                 lengths: torch.Tensor, ragged: bool = True):
    """The target over ``tokens [B, n]`` at ``positions``, written after the cache's common length; row b
    attends its prefix ``[0, lengths[b])`` and the nodes ``tree_mask [B, n, n]`` shows it. Returns logits
    ``[B, n, V]`` and final-norm features ``[B, n, H]``. ragged=False: the caller knows every row's length is
    the common one (the attention then needs no prefix lengths)."""
    B, n = tokens.shape
    P = cache.length
    with row_invariant():
        if _attention_impl(target) == TREE_ATTENTION:
            ragged = lengths if ragged else None
            out = target.model.model(input_ids=tokens, position_ids=positions, past_key_values=cache,
                                     use_cache=True, tree_mask=tree_mask, tree_prefix_lens=ragged)
        else:  # eager / sdpa: the same visibility as an additive 4D mask over [prefix, tree]
            dtype = target.dtype
            visible = torch.cat([(torch.arange(P, device=tokens.device) < lengths[:, None])[:, None].expand(B, n, P),
                                 tree_mask], dim=2)
            mask = torch.zeros(B, 1, n, P + n, dtype=dtype, device=tokens.device)
            mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
            out = target.model.model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                                     past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state
        return target.model.lm_head(hidden), hidden


# ---- vanilla ------------------------------------------------------------------------------------------------

def batched_vanilla_decode(target, prompts: Sequence[torch.Tensor], max_new: Sequence[int], sampling: Sampling,
                           generators, eos) -> Iterator[Event]:
    """Autoregressive decoding of a batch: one target forward over one token per running row per step."""
    capacity = max(p.shape[1] for p in prompts) + max(max_new) + 1
    check_target(target, capacity, "batched decoding")
    rows = _Rows(max_new, generators, eos)
    cache, logits, _ = _prefill_rows(target, prompts, capacity)
    lengths = [p.shape[1] for p in prompts]
    dev = target.device
    tokens = _sample_rows(logits, sampling, rows.generators)
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
    while True:
        events, tokens, lengths, _ = _emit_and_drop(rows, [[t] for t in tokens], [None] * len(tokens), lengths,
                                                    (cache,))
        yield from events
        if not rows.ids:
            return
        B = len(rows.ids)
        tok = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]
        length_t = torch.tensor(lengths, dtype=torch.long, device=dev)
        P = cache.length
        ragged = any(n != P for n in lengths)
        logits, _ = forward_rows(target, cache, tok, length_t[:, None], one.expand(B, 1, 1), length_t, ragged)
        if ragged:  # the new entries of the shorter rows go to their own length
            cache.keep(torch.tensor([[P if n < P else -1] for n in lengths], device=dev), length_t)
        lengths = [n + 1 for n in lengths]
        cache.truncate(max(lengths))
        tokens = _sample_rows(logits[:, -1], sampling, rows.generators)


def _emit_and_drop(rows: _Rows, chunks: List[List[int]], accepted: List[Optional[int]], lengths: List[int],
                   caches):
    """Commit each cache row's new tokens and drop the rows that finished from ``caches`` and the host lists.
    Returns the events to yield, each running row's last token and length, and the kept rows' indices (None when
    every row runs on)."""
    events, keep = [], []
    for b, chunk in enumerate(chunks):
        kept, stop = rows.commit(b, chunk)
        events.append(Event(rows.ids[b], kept, accepted[b], stop))
        if stop is None:
            keep.append(b)
    if len(keep) == len(chunks):
        return events, [c[-1] for c in chunks], lengths, None
    if keep:
        for c in caches:
            c.select_rows(keep)
    rows.keep(keep)
    return events, [chunks[b][-1] for b in keep], [lengths[b] for b in keep], keep


# ---- speculative --------------------------------------------------------------------------------------------

def batched_speculative_decode(target, draft: DraftModel, prompts: Sequence[torch.Tensor], max_new: Sequence[int],
                               sampling: Sampling, generators, eos, total_tokens: int, depth: int,
                               tree_topk: int) -> Iterator[Event]:
    """Speculative decoding of a batch: per round one draft tree per running row (one draft forward per level for
    the batch), one target forward over all rows' trees, verify_tree over the batch, one host read."""
    check_tree_options(total_tokens, depth, tree_topk)
    longest = max(p.shape[1] for p in prompts)
    room = max(max_new) + depth + max(total_tokens, depth * tree_topk) + 1
    check_target(target, longest + room)
    rows = _Rows(max_new, generators, eos)
    cache, logits, feats = _prefill_rows(target, prompts, longest + room)
    lengths = [p.shape[1] for p in prompts]
    dev = target.device
    first = _sample_rows(logits, sampling, rows.generators)
    dcache = draft.new_cache(batch=len(prompts), capacity=longest + room)
    # the draft context pass over each prompt: pairs (f_t, x_{t+1}), the prompt shifted by one plus the first token
    pairs = [(f, torch.cat([p[0, 1:], torch.tensor([t], device=dev)])) for f, p, t in zip(feats, prompts, first)]
    root_hidden = _extend(draft, dcache, [0] * len(prompts), pairs)
    chunks, accepted = [[t] for t in first], [None] * len(first)
    while True:
        events, roots, lengths, keep = _emit_and_drop(rows, chunks, accepted, lengths, (cache, dcache))
        yield from events
        if not rows.ids:
            return
        if keep is not None:
            root_hidden = root_hidden[keep]
        levels = min(depth, max(m - p for m, p in zip(rows.max_new, rows.produced)) - 1)
        chunks, accepted, lengths, root_hidden = batched_round(
            target, draft, cache, dcache, roots, lengths, root_hidden, sampling, rows.generators,
            total_tokens, levels, tree_topk)


def batched_round(target, draft, cache, dcache, roots: List[int], lengths: List[int], root_hidden: torch.Tensor,
                  sampling: Sampling, generators, total_tokens: int, depth: int, tree_topk: int):
    """One round for every row: returns each row's new tokens (accepted draft tokens + the bonus token), accepted
    counts, new lengths and the draft's outputs at the new roots."""
    dev = root_hidden.device
    length_t = torch.tensor(lengths, dtype=torch.long, device=dev)
    root_t = torch.tensor(roots, dtype=torch.long, device=dev)
    dcache.length = cache.length  # both right-padded to the longest row
    tree = draft_trees(draft, dcache, root_hidden, root_t, length_t, total_tokens, depth, tree_topk)
    logits, hidden = forward_rows(target, cache, tree.tokens, length_t[:, None] + tree.depths, tree.mask, length_t,
                                  ragged=any(n != cache.length for n in lengths))
    chunks, path = _accept_rows(logits, tree, sampling, generators)
    P = cache.length - tree.size
    slots = torch.where(path >= 0, path + P, -1)
    cache.keep(slots, length_t)
    new_lengths = [n + len(c) for n, c in zip(lengths, chunks)]
    cache.truncate(max(new_lengths))
    m = path.shape[1]
    feats = hidden.gather(1, path.clamp(min=0)[..., None].expand(-1, m, hidden.shape[-1]))
    pairs = [(feats[b, :len(c)], torch.tensor(c, dtype=torch.long, device=dev)) for b, c in enumerate(chunks)]
    return chunks, [len(c) - 1 for c in chunks], new_lengths, _extend(draft, dcache, lengths, pairs)


def _accept_rows(logits: torch.Tensor, tree: Tree, sampling: Sampling, generators):
    """verify_tree over the batch and one host read: each row's new tokens and the accepted paths ``[B, m]``
    (node indices from the root, -1 padded; m = the longest path)."""
    B, n = tree.tokens.shape
    uniforms = None
    if sampling.temperature > 0:
        uniforms = torch.stack([torch.rand(n, generator=g, device=logits.device) for g in generators])
    accepted, accept_len, next_token = ops.verify_tree(logits, tree.tokens, tree.parents, sampling.temperature,
                                                       sampling.top_p, sampling.top_k, uniforms=uniforms)
    path_tokens = tree.tokens.gather(1, accepted.clamp(min=0))
    host = torch.cat([accept_len[:, None], next_token[:, None], path_tokens], dim=1).tolist()  # the one read
    chunks = [row[3: 3 + row[0]] + [row[1]] for row in host]
    m = max(len(c) for c in chunks)
    return chunks, accepted[:, :m]


def _extend(draft: DraftModel, dcache, lengths: List[int], pairs) -> torch.Tensor:
    """The draft context pass for every row: row b's pairs (features ``[m_b, H]``, tokens ``[m_b]``) at draft
    positions ``lengths[b] ...``; written after the cache's common length, moved into place, and the common
    length set to the longest row. Returns the draft's outputs at each row's last pair ``[B, H]``."""
    B = len(pairs)
    if B == 1:  # a lone row: the plain context pass
        dcache.length = lengths[0]
        return context_pass(draft, dcache, *pairs[0])[None]
    dev = pairs[0][1].device
    m = [int(t.shape[0]) for _, t in pairs]
    M, D = max(m), dcache.length
    H = pairs[0][0].shape[-1]
    feats = torch.zeros(B, M, H, dtype=draft.dtype, device=dev)
    tokens = torch.zeros(B, M, dtype=torch.long, device=dev)
    for b, (f, t) in enumerate(pairs):
        feats[b, :m[b]] = f
        tokens[b, :m[b]] = t
    length_t = torch.tensor(lengths, dtype=torch.long, device=dev)
    step = torch.arange(M, device=dev)
    prefix = (torch.arange(D, device=dev) < length_t[:, None])[:, None].expand(B, M, D)
    causal = (step[None, :] <= step[:, None])[None].expand(B, M, M)
    dcache.reserve(D + M)
    out = draft(tokens, feats, position_ids=length_t[:, None] + step, cache=dcache, cache_pos=D,
                attn_mask=torch.cat([prefix, causal], dim=2))
    slots = torch.where(step[None] < torch.tensor(m, device=dev)[:, None], D + step, -1)
    if any(n != D for n in lengths):
        dcache.compact(slots, length_t)
    dcache.length = max(n + k for n, k in zip(lengths, m))
    last = torch.tensor(m, device=dev) - 1
    return out[torch.arange(B, device=dev), last]


# ---- round costs of a batch (the tree choice for a batch size) ----------------------------------------------

@torch.inference_mode()
def measure_batch_costs(target, draft, shapes, taus, batch: int, context: int = 128, repeats: int = 5,
                        tick=lambda: None):
    """``tree_choice.measure_costs`` for ``batch`` rows: seconds of one batched round per shape (draft trees,
    the verification forward over batch x total_tokens tokens, the context pass over round(tau) tokens per row;
    the median of ``repeats``, shapes timed in turns) and of one batched vanilla step, after ``context``-token
    random prompts."""
    g = torch.Generator().manual_seed(0)
    dev = target.device
    prompts = [torch.randint(0, target.config.vocab_size, (1, context), generator=g).to(dev) for _ in range(batch)]
    room = max(max(n, d * k) for n, d, k in shapes) + 8
    cache, logits, feats = _prefill_rows(target, prompts, context + room)
    dcache = draft.new_cache(batch=batch, capacity=context + room)
    pairs = [(f, p[0]) for f, p in zip(feats, prompts)]
    hidden = _extend(draft, dcache, [0] * batch, pairs)
    lengths = torch.full((batch,), context, dtype=torch.long, device=dev)
    roots = prompts[0][0, :batch] if context >= batch else torch.zeros(batch, dtype=torch.long, device=dev)
    one = torch.ones(batch, 1, 1, dtype=torch.bool, device=dev)

    def one_round(shape):
        n, d, k = shape
        tree = draft_trees(draft, dcache, hidden, roots, lengths, n, d, k)
        forward_rows(target, cache, tree.tokens, lengths[:, None] + tree.depths, tree.mask, lengths, ragged=False)
        cache.truncate(context)
        m = max(1, round((taus or {}).get(shape, 1.0)))
        _extend(draft, dcache, [context] * batch, [(f[:m], p[0, :m]) for f, p in zip(feats, prompts)])
        dcache.length = context  # timed only: the context stays as it was

    def step():
        forward_rows(target, cache, roots[:, None], lengths[:, None], one, lengths, ragged=False)[0].argmax(-1)
        cache.truncate(context)

    medians = median_times({"vanilla": step, **{s: (lambda s=s: one_round(s)) for s in shapes}}, dev, repeats, tick)
    return {s: medians[s] for s in shapes}, medians["vanilla"]
