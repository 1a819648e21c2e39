"""Fixed-shape speculative rounds: the decode loop built for CUDA graphs.

For one tree shape (total_tokens, depth, tree_topk) every round runs the same kernels on tensors of the same
shapes at the same addresses, and reads nothing back from the device until it is over. That makes the round
capturable in a CUDA graph and replayable: one launch per round instead of ~1,000, no Python in between.

Layout (``B`` rows, one for ``generate``):
- the state lives on the device: ``lengths [B]`` (committed positions, the same in both caches), ``roots [B]``
  (the newest committed token of each row, in neither cache yet) and ``root_hidden [B, H]`` (the draft's output
  at the last committed position);
- target cache (a SlotCache): committed entries in slots ``[0, lengths[b])``, the tree always at slots
  ``[T, T + n)``, ``T = room`` (its common length between rounds); tree attention sees row b's prefix
  ``[0, lengths[b])`` through its prefix lengths, so a node's logits are bit for bit a vanilla step's;
- draft cache: committed entries in ``[0, lengths[b])``, the context-pass scratch at ``[T, T + depth + 1)``, the
  tree levels after it.
A round: draft tree (no early stop: every level is drafted), verify forward, verify_tree, one compact_kv per
cache moving the accepted entries from the scratch slots to ``lengths[b] ...`` (the host-side lengths never
move), then the draft context pass over ``depth + 1`` pairs (the accepted ones, then padding that is never
moved). Its results land in ``result [B, depth + 2]``: each row's count of new tokens, then the tokens (the
accepted draft tokens and the bonus token, -1 after them): the one thing the host reads per round.

Rounds always draft ``depth`` levels, so the last round may produce more tokens than are still wanted: the
caller keeps what it needs (the caches hold ``depth + 1`` positions of slack for it).
"""
import warnings
from typing import Iterator, Optional

import torch

from . import ops
from .batch import _extend, forward_rows
from .draft import DraftModel
from .sampling import greedy_token, sample_token
from .speculative import Sampling, check_target
from .tree import check_tree_options, draft_trees


class StaticRounds:
    """The state and fixed-shape rounds of speculative decoding for ``B`` rows (module docstring).

    room: committed positions the caches hold (prompt + max_new_tokens + depth + 1 is enough for a decode).
    """

    def __init__(self, target, draft: DraftModel, prompts, first_tokens, prefill, sampling: Sampling,
                 generators, room: int, total_tokens: int, depth: int, tree_topk: int):
        check_tree_options(total_tokens, depth, tree_topk)
        self.target, self.draft, self.sampling = target, draft, sampling
        self.generators = list(generators)
        self.n, self.depth = total_tokens, depth
        self.k = min(tree_topk, draft.tree_vocab_size)
        # the most new tokens a round commits: the accepted draft tokens (at most depth, at most the tree's nodes
        # below the root) and the bonus token
        self.width = min(depth, total_tokens - 1) + 1
        self.room = room
        cache, feats = prefill
        dev = target.device
        B = len(prompts)
        lengths = [int(p.shape[1]) for p in prompts]
        if max(lengths) + self.width > room:
            raise ValueError(f"StaticRounds: room {room} does not hold the longest prompt ({max(lengths)}) and one "
                             f"round ({self.width})")
        self.cache = cache  # the target's SlotCache: capacity room + total_tokens
        for b, n in enumerate(lengths):  # masked slots are still multiplied by an eager/sdpa attention: no NaN there
            cache.buffer[:, b, :, n:].zero_()
        self.dcache = draft.new_cache(batch=B, capacity=room + self.width + max(0, depth - 1) * self.k)
        pairs = [(f, torch.cat([p[0, 1:], torch.tensor([t], device=dev)])) for f, p, t in
                 zip(feats, prompts, first_tokens)]
        self.root_hidden = _extend(draft, self.dcache, [0] * B, pairs)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=dev)
        self.roots = torch.tensor(first_tokens, dtype=torch.long, device=dev)
        self.result = torch.zeros(B, self.width + 1, dtype=torch.long, device=dev)
        self.uniforms = torch.zeros(B, total_tokens, device=dev) if sampling.temperature > 0 else None
        self._step = torch.arange(self.width, device=dev)
        self._prefix_cols = torch.arange(room, device=dev)
        self.cache.truncate(room)

    @torch.inference_mode()
    def draw_uniforms(self) -> None:
        """The round's uniforms for verify_tree, each row's from its own generator (outside any CUDA graph: a
        replay reuses the buffer, refilled here before it)."""
        if self.uniforms is not None:
            for b, g in enumerate(self.generators):
                self.uniforms[b].copy_(torch.rand(self.n, generator=g, device=self.uniforms.device))

    @torch.inference_mode()
    def round(self) -> None:
        """One round on the device: the state advances in place and ``result`` holds the new tokens."""
        draft, cache, dcache = self.draft, self.cache, self.dcache
        T, M = self.room, self.width
        B = self.lengths.shape[0]
        cache.truncate(T)  # (already so, unless a failed CUDA graph capture stopped a round half-way)
        dcache.length = T + M  # the tree levels go after the context-pass scratch
        tree = draft_trees(draft, dcache, self.root_hidden, self.roots, self.lengths, self.n, self.depth, self.k,
                           early_stop=False)
        logits, hidden = forward_rows(self.target, cache, tree.tokens, self.lengths[:, None] + tree.depths,
                                      tree.mask, self.lengths, ragged=True)
        s = self.sampling
        accepted, accept_len, next_token = ops.verify_tree(logits, tree.tokens, tree.parents, s.temperature, s.top_p,
                                                           s.top_k, uniforms=self.uniforms)
        path = accepted[:, :M]  # root, then the accepted nodes; -1 after
        count = accept_len + 1
        step = self._step[None]
        drafted = torch.cat([tree.tokens.gather(1, path[:, 1:].clamp(min=0)), next_token[:, None]], dim=1)
        new = torch.where(step < accept_len[:, None], drafted,
                          torch.where(step == accept_len[:, None], next_token[:, None], -1))
        cache.keep(torch.where(path >= 0, path + T, -1), self.lengths)
        cache.truncate(T)
        # the draft context pass: pairs (target features at the accepted path, the token after each) written at
        # the scratch slots, every row attending its own prefix and the pairs before; the valid ones moved in place
        H = hidden.shape[-1]
        feats = hidden.gather(1, path.clamp(min=0)[..., None].expand(B, M, H))
        visible = torch.cat([(self._prefix_cols[None] < self.lengths[:, None])[:, None].expand(B, M, T),
                             (step <= step.view(M, 1))[None].expand(B, M, M)], dim=2)
        out = draft(new.clamp(min=0), feats, position_ids=self.lengths[:, None] + step, cache=dcache, cache_pos=T,
                    attn_mask=visible)
        dcache.compact(torch.where(step < count[:, None], T + step, -1), self.lengths)
        last = (count - 1)[:, None]
        self.root_hidden.copy_(out.gather(1, last[..., None].expand(B, 1, H))[:, 0])
        self.roots.copy_(new.gather(1, last)[:, 0])
        self.lengths.add_(count)
        self.result[:, 0].copy_(count)
        self.result[:, 1:].copy_(new)

    def read(self) -> list:
        """The host read of a round: per row, its new tokens."""
        return [row[1: 1 + row[0]] for row in self.result.tolist()]


class Replayer:
    """Calls ``fn``, a fixed-shape step (the same kernels on the same buffers every call), eagerly or, with
    ``cuda_graphs``, from a CUDA graph: the first call runs eagerly on a side stream (the warm-up a capture needs:
    allocator pools, library workspaces, lazy kernel loads) and counts as a real step; the second captures ``fn``
    (which runs nothing) and replays it; every later call replays. A capture that fails (e.g. a custom target
    layer that reads a value back) falls back to eager calls, with a warning: the output is the same."""

    def __init__(self, fn, cuda_graphs: bool):
        self.fn, self.cuda_graphs = fn, cuda_graphs
        self.graph, self.calls = None, 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.cuda_graphs:
            self.fn()
        elif self.calls == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self._capture()
            if self.graph is None:
                self.fn()
            else:
                self.graph.replay()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except RuntimeError as e:
            warnings.warn(f"the decode step could not be captured in a CUDA graph ({e}); decoding with eager steps "
                          f"(the same output, more launch overhead)", RuntimeWarning, stacklevel=3)
            self.cuda_graphs = False
            return
        self.graph = graph


def _check_graphs(target, cuda_graphs: bool) -> None:
    if cuda_graphs and target.device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA target; {target.name} is on {target.device}")


def static_speculative_decode(target, draft: DraftModel, input_ids: torch.Tensor, max_new_tokens: int,
                              temperature: float, top_p: float, top_k: int, generator: Optional[torch.Generator],
                              total_tokens: int, depth: int, tree_topk: int, cuda_graphs: bool = False
                              ) -> Iterator[tuple]:
    """``speculative_decode`` on fixed-shape rounds (module docstring), replayed from a CUDA graph when
    ``cuda_graphs``: the same ``(new_token_ids, accepted)`` chunks, with greedy output token-identical to it and
    to vanilla decoding. Only the last round differs: it drafts the full depth (the caller keeps what it needs)."""
    check_tree_options(total_tokens, depth, tree_topk)
    _check_graphs(target, cuda_graphs)
    room = input_ids.shape[1] + max_new_tokens + min(depth, total_tokens - 1) + 1
    check_target(target, room + total_tokens)
    sampling = Sampling(temperature, top_p, top_k, generator)
    with torch.inference_mode():
        pre = target.prefill(input_ids, past_key_values=target.new_cache(room + total_tokens))
        first = int(sample_token(pre.logits[:, -1], temperature, top_p, top_k, generator)[0])
        rounds = StaticRounds(target, draft, [input_ids], [first], (pre.past_key_values, [pre.hidden_states[0]]),
                              sampling, [generator], room, total_tokens, depth, tree_topk)
    yield [first], None
    run = Replayer(rounds.round, cuda_graphs)
    produced = 1
    while produced < max_new_tokens:
        rounds.draw_uniforms()
        run()
        tokens = rounds.read()[0]
        produced += len(tokens)
        yield tokens, len(tokens) - 1


# ---- vanilla decoding --------------------------------------------------------------------------------------------

class StaticSteps:
    """Vanilla decode steps of fixed shape for ``B`` rows: each row's newest token (``tokens [B]``) is written at
    the fixed slot ``room`` of the SlotCache, attends its row's prefix ``[0, lengths[b])`` (tree attention's
    prefix lengths: the bits of a plain decode step), and moves to slot ``lengths[b]``; ``logits [B, V]`` holds
    the next-token logits. Greedy steps also put the argmax in ``tokens``; a sampled token is drawn by the caller
    (its generator outside any graph) and written into ``tokens``."""

    def __init__(self, target, cache, lengths, tokens, room: int, greedy: bool):
        dev = target.device
        self.target, self.cache, self.room, self.greedy = target, cache, room, greedy
        B = len(lengths)
        for b, n in enumerate(lengths):
            cache.buffer[:, b, :, n:].zero_()
        cache.truncate(room)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=dev)
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=dev)
        self.logits = torch.zeros(B, target.config.vocab_size, dtype=target.dtype, device=dev)
        self._one = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        self._slot = torch.full((B, 1), room, dtype=torch.long, device=dev)

    @torch.inference_mode()
    def step(self) -> None:
        cache = self.cache
        cache.truncate(self.room)
        logits, _ = forward_rows(self.target, cache, self.tokens[:, None], self.lengths[:, None], self._one,
                                 self.lengths, ragged=True)
        cache.keep(self._slot, self.lengths)
        cache.truncate(self.room)
        self.lengths.add_(1)
        self.logits.copy_(logits[:, -1])
        if self.greedy:
            self.tokens.copy_(greedy_token(self.logits))


def static_vanilla_decode(target, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                          top_k: int, generator: Optional[torch.Generator], cuda_graphs: bool = False
                          ) -> Iterator[tuple]:
    """``vanilla_decode`` on fixed-shape steps (StaticSteps), replayed from a CUDA graph when ``cuda_graphs``:
    the same ``([token], None)`` chunks, token-identical to it on the row-invariant kernels. One host read per
    step (the token)."""
    _check_graphs(target, cuda_graphs)
    room = input_ids.shape[1] + max_new_tokens
    check_target(target, room + 1, "fixed-shape decoding")
    with torch.inference_mode():
        pre = target.prefill(input_ids, past_key_values=target.new_cache(room + 1))
        token = sample_token(pre.logits[:, -1], temperature, top_p, top_k, generator)
        steps = StaticSteps(target, pre.past_key_values, [input_ids.shape[1]], [int(token[0])], room,
                            greedy=temperature == 0)
    yield [int(token[0])], None
    run = Replayer(steps.step, cuda_graphs)
    for _ in range(max_new_tokens - 1):
        run()
        if temperature > 0:
            with torch.inference_mode():
                steps.tokens.copy_(sample_token(steps.logits, temperature, top_p, top_k, generator))
        yield [int(steps.tokens[0])], None
