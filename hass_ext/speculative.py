"""The decode loops behind ``generate``: vanilla autoregressive decoding and speculative decoding with an
EAGLE/HASS draft. Both are generators of ``(new_token_ids, accepted)`` chunks; the target, the draft and the
tree shape come in resolved (hass_ext.generate does that once).

Speculative decoding:

    initial_state  target prefill over the prompt -> first token; draft context pass over (features, next tokens)
    loop:
      draft_tree   EAGLE-2 dynamic tree below the last committed token (hass_ext.tree)
      verify       one target forward over the tree tokens with the tree attention mask
      accept       hass_ext.ops.verify_tree: the accepted path and the bonus token
      compact      move the accepted entries of the target KV cache into place, drop the rest of the tree
      extend       draft context pass over the accepted tokens with the target's features at them

Cache invariant between rounds: the target cache and the draft cache both hold ``length`` positions (every
committed token except the newest, the ``root``); ``root_hidden`` is the draft's output at the last position,
which predicts the token after the root. The draft never keeps tree entries: they are written after its
``length`` and overwritten next round, and the context pass recomputes the accepted positions from the target's
real features (the tree used the draft's own predicted features there).
"""
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import ops
from .draft import DraftCache, DraftModel, context_pass
from .draft_io import resolve_draft as _resolve_draft
from .hf_attention import ATTN_IMPLEMENTATION
from .ops.small_linear import row_invariant
from .sampling import sample_token
from .tree import DEFAULT_DEPTH, DEFAULT_TOTAL_TOKENS, DEFAULT_TREE_TOPK, Tree, check_tree_options, draft_tree

TREE_ATTENTION = ATTN_IMPLEMENTATION  # the tree-attention kernel: the ancestor mask is passed as tree_mask
_SUPPORTED_ATTENTION = ("eager", "sdpa", TREE_ATTENTION)  # eager/sdpa honour a custom 4D float mask
_ONE_NODE = torch.ones(1, 1, 1, dtype=torch.bool)  # a decode step's token as a one-node tree


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    generator: Optional[torch.Generator]


@dataclass
class State:
    cache: object              # the target's hass_ext.kv_cache.SlotCache (Target.new_cache)
    draft_cache: DraftCache
    length: int                # positions held by both caches
    root: int                  # the newest committed token (in neither cache yet)
    root_hidden: torch.Tensor  # [H] draft output at position length - 1


# ---- vanilla decoding -------------------------------------------------------------------------------------

def vanilla_decode(target, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                   top_k: int, generator: Optional[torch.Generator]) -> Iterator[tuple]:
    """Autoregressive decoding with a KV cache: the baseline every speedup is measured against. Yields
    ``([token], None)`` per step."""
    cache = target.new_cache(input_ids.shape[1] + max_new_tokens)
    logits = target.prefill(input_ids, past_key_values=cache).logits[:, -1]
    for _ in range(max_new_tokens):
        token = sample_token(logits, temperature, top_p, top_k, generator)
        yield [int(token)], None
        logits = decode_step(target, token, cache)


@torch.no_grad()
def decode_step(target, token: torch.Tensor, cache) -> torch.Tensor:
    """One vanilla step: the target over one token, appending to its KV cache; the next logits ``[1, V]``.

    It runs on the kernels of a tree verification (row-invariant linear layers; with the hass_tree attention, the
    tree-attention kernel over a one-node tree), so a tree node's logits are bit-identical to this step's."""
    extra = {"tree_mask": _ONE_NODE.to(token.device)} if _attention_impl(target) == TREE_ATTENTION else {}
    with row_invariant():
        return target.model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True, **extra).logits[:, -1]


# ---- the decode loop --------------------------------------------------------------------------------------

def speculative_decode(target, draft: DraftModel, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                       top_p: float, top_k: int, generator: Optional[torch.Generator],
                       total_tokens: int = DEFAULT_TOTAL_TOKENS, depth: int = DEFAULT_DEPTH,
                       tree_topk: int = DEFAULT_TREE_TOPK) -> Iterator[tuple]:
    """Yield ``(new_token_ids, accepted)`` chunks: first the prefill's token (accepted None), then per round the
    accepted draft tokens plus the bonus token (accepted = number of accepted draft tokens).

    draft: a DraftModel ready for the target (``hass_ext.draft_io.resolve_draft``); the tree shape as ints
    (``hass_ext.tree_choice.resolve_tree`` sizes it for the device)."""
    check_tree_options(total_tokens, depth, tree_topk)
    check_target(target, input_ids.shape[1] + max_new_tokens + total_tokens)
    sampling = Sampling(temperature, top_p, top_k, generator)
    # the caches hold the prompt, every token produced and one tree (the draft's: depth levels of tree_topk)
    room = max_new_tokens + max(total_tokens, depth * tree_topk)
    state = initial_state(target, draft, input_ids, sampling, room=room)
    yield [state.root], None
    produced = 1
    while produced < max_new_tokens:
        # at most max_new_tokens - produced tokens are still wanted: never draft deeper than that
        levels = min(depth, max_new_tokens - produced - 1)
        new_tokens, n_accepted = speculative_round(target, draft, state, sampling, total_tokens, levels, tree_topk)
        produced += len(new_tokens)
        yield new_tokens, n_accepted


def _untimed(phase: str):
    return nullcontext()


def speculative_round(target, draft, state: State, sampling: Sampling, total_tokens: int, depth: int,
                      tree_topk: int, phase=_untimed) -> tuple:
    """One round from ``state`` (advanced in place): returns the new tokens (accepted draft tokens + the bonus
    token) and the number of accepted draft tokens.

    phase: called with each step's name ("draft", "verify", "accept", "compact", "extend") for a context manager
    wrapped around that step; bench/bench_round.py times the steps with it.
    """
    with phase("draft"):
        tree = draft_tree(draft, state.draft_cache, state.root_hidden, state.root, total_tokens, depth, tree_topk)
    with phase("verify"):
        logits, features = verify(target, state, tree)
    with phase("accept"):
        path, new_tokens, in_place = accept(logits, tree, sampling)
    with phase("compact"):
        compact(state, path, in_place)
    with phase("extend"):
        extend(draft, state, features[path], new_tokens)
    return new_tokens, len(new_tokens) - 1


@torch.inference_mode()
def initial_state(target, draft: DraftModel, input_ids: torch.Tensor, sampling: Sampling, room: int = 1024
                  ) -> State:
    """The state before the first round: the target's prefill over the prompt, the first token, and the draft
    context pass over the whole prompt. Both caches are allocated here for the prompt and ``room`` positions more
    (the tokens to come and one tree)."""
    capacity = input_ids.shape[1] + room
    pre = target.prefill(input_ids, past_key_values=target.new_cache(capacity))
    first = int(sample_token(pre.logits[:, -1], sampling.temperature, sampling.top_p, sampling.top_k,
                             sampling.generator)[0])
    cache = draft.new_cache(batch=1, capacity=capacity)
    state = State(cache=pre.past_key_values, draft_cache=cache, length=input_ids.shape[1], root=first,
                  root_hidden=None)
    # pairs (f_t, x_{t+1}): the prompt's features with the prompt shifted by one plus the first token
    extend(draft, state, pre.hidden_states[0], input_ids[0, 1:].tolist() + [first])
    return state


@torch.inference_mode()
def verify(target, state: State, tree: Tree):
    """One target forward over the tree: node i at position ``length + depth_i``, attending to the whole cache and
    to its ancestors in the tree. Returns logits ``[1, n, V]`` and final-norm features ``[n, H]``."""
    with row_invariant():
        return _verify_forward(target, state, tree)


def _verify_forward(target, state: State, tree: Tree):
    n, P = tree.size, state.length
    positions = (P + tree.depths)[None]
    if _attention_impl(target) == TREE_ATTENTION:  # hass_ext's tree-attention kernel takes the ancestor mask
        out = target.model.model(input_ids=tree.tokens[None], position_ids=positions, past_key_values=state.cache,
                                 use_cache=True, tree_mask=tree.mask[None])
    else:  # eager / sdpa: the same visibility as an additive 4D mask over [cache, tree]
        dtype = target.dtype
        mask = torch.zeros(1, 1, n, P + n, dtype=dtype, device=target.device)
        mask[0, 0, :, P:].masked_fill_(~tree.mask, torch.finfo(dtype).min)
        out = target.model.model(input_ids=tree.tokens[None], position_ids=positions, attention_mask=mask,
                                 past_key_values=state.cache, use_cache=True)
    hidden = out.last_hidden_state
    return target.model.lm_head(hidden), hidden[0]


def accept(logits: torch.Tensor, tree: Tree, sampling: Sampling):
    """The accepted path (node indices from the root, a tensor on the device), the new tokens (a list: the
    accepted draft tokens, then the bonus token) and whether the path is nodes ``0, 1, ..., n`` (a chain's always
    is: its K/V are already in place), read back from the device in one transfer.

    Acceptance rule (hass_ext.ops.verify_tree): walk down from the root, trying each node's children in node
    order. Greedy: accept the child whose token is the target's argmax at the node. Sampling: accept child x with
    probability p(x), p the target's filtered distribution at the node; on rejection set p(x) = 0, renormalise and
    try the next sibling. The walk stops at the first node with no accepted child; the bonus token is the argmax
    there (greedy) or a draw from what is left of p. Drafts are deterministic top-k choices, so the tokens
    produced follow the target's own distribution exactly.
    """
    accepted, accept_len, next_token = ops.verify_tree(logits, tree.tokens[None], tree.parents[None],
                                                       sampling.temperature, sampling.top_p, sampling.top_k,
                                                       sampling.generator)
    # the host needs n (how much to keep), the tokens (the output) and the nodes (are they in place?): one read
    nodes = accepted[0, 1:]
    host = torch.cat([accept_len, tree.tokens[nodes.clamp(min=0)], next_token, nodes]).tolist()
    n, width = host[0], nodes.shape[0]
    in_place = host[width + 2: width + 2 + n] == list(range(1, n + 1))
    return accepted[0, : n + 1], host[1: n + 1] + [host[width + 1]], in_place


@torch.inference_mode()
def compact(state: State, path: torch.Tensor, in_place: bool = False) -> None:
    """Keep the root and the accepted nodes in the target cache: move their K/V (written at ``length + node``
    by the verify forward) to ``length, length + 1, ...`` in every layer at once (one compact_kv over the cache's
    buffer), then drop the rest.
    in_place: the path is nodes ``0 .. n`` (nothing to move, only the rest to drop)."""
    if in_place:
        state.cache.truncate(state.length + path.shape[0])
    else:
        state.cache.keep(path + state.length, state.length)
    state.length += path.shape[0]


@torch.inference_mode()
def extend(draft: DraftModel, state: State, features: torch.Tensor, tokens: list) -> None:
    """Draft context pass: the pairs (features[i], tokens[i]) at draft positions ``length .. length + m - 1``.

    features are the target's at the newly committed positions; tokens are the tokens that follow them, the
    last one being the new root. Afterwards both caches hold the same positions.
    """
    ids = torch.tensor(tokens, dtype=torch.long, device=features.device)
    cache = state.draft_cache
    state.root, state.root_hidden = tokens[-1], context_pass(draft, cache, features, ids)
    if cache.length != state.length:
        raise RuntimeError(f"draft cache ({cache.length}) and target cache ({state.length}) went out of step")


# ---- checks -----------------------------------------------------------------------------------------------

def _attention_impl(target) -> str:
    return getattr(target.model.config, "_attn_implementation", None) or "eager"


def check_target(target, needed_length: int, what: str = "speculative decoding") -> None:
    """Raise ValueError for targets whose attention ignores the tree mask or whose cache cannot be compacted.
    what: the decoding that needs them, for the message ("batched decoding" for a vanilla batch, whose steps are
    one-node trees over rows of different lengths)."""
    impl = _attention_impl(target)
    if impl not in _SUPPORTED_ATTENTION:
        raise ValueError(f"{what} needs the target's attention to take the tree mask "
                         f"(attn_implementation in {_SUPPORTED_ATTENTION}; '{TREE_ATTENTION}' after "
                         f"hass_ext.register_hass_tree()); {target.name} uses {impl!r}")
    window = getattr(target.model.config, "sliding_window", None)
    layer_types = getattr(target.model.config, "layer_types", None) or []
    sliding = window is not None and (not layer_types or any("sliding" in str(t) for t in layer_types))
    if sliding and getattr(target.model.config, "use_sliding_window", True) and needed_length >= window - 1:
        raise ValueError(f"{target.name} uses sliding-window attention (window {window}); {what} supports it only "
                         f"while prompt + max_new_tokens (+ tree size) < {window - 1}, here {needed_length}")


_DEPRECATED = {"prefill": ("initial_state", lambda: initial_state),
               "resolve_draft": ("hass_ext.draft_io.resolve_draft", lambda: _resolve_draft)}


def __getattr__(name):  # the names this module had before the flow was split, for one release
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(f"hass_ext.speculative.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
