"""The EAGLE-2 dynamic draft tree: expand the draft's most probable paths, keep the best nodes.

Starting from the root (the last committed token, whose draft output ``root_hidden`` the context pass produced):

1. level 1 = the ``top_k`` most probable next tokens; a node's score is its path's cumulative draft log-prob;
2. ``depth - 1`` expansion steps: the k frontier nodes go through the draft in one forward (all at the same
   position, each attending to the context, its ancestors and itself); each yields its top-k children, and the
   k best of those k*k children by score become the next frontier. Every child is a candidate;
3. the ``total_tokens - 1`` best candidates by score become the tree, in level order (ascending candidate index).

Every step runs on the device and nothing is read back, except for the exact early stop of step 2 (below), which
reads one count per level: it runs where such a read is free (the CPU: ``EARLY_STOP_DEVICES``). Elsewhere every
level is expanded, so every round has the same shapes and the host waits on nothing until verification's result.

A child's score is never above its parent's (log-probs are <= 0), and candidates are ranked by a *stable* sort
of the scores, where a parent always precedes its children in candidate order: so the selection is closed under
parents even at ties (docs/algorithms.md#p5-tree-ties: the upstream selection could keep a child without its parent).
The tree nodes' draft K/V go after the cache's accepted context and are never counted in ``cache.length``.

With a hot vocabulary (``draft.hot_token_ids``, FR-Spec style) every expansion computes logits over those N rows
of the lm_head only, ranks the top-k among them (log-probs normalised over the N) and maps the chosen columns
back to target ids. This stays lossless: verification (hass_ext.ops.verify_tree) decides from the target's own
full-vocabulary distribution alone, the draft only chooses which tokens are tried; a target token outside the
hot set is simply never proposed and comes out as the bonus token.
"""
from dataclasses import dataclass
from typing import Optional

import torch

# The EAGLE-2 tree: the shape used when the tree is not sized for the device (an int total_tokens).
DEFAULT_TOTAL_TOKENS = 60
DEFAULT_DEPTH = 6          # draft levels: at most 6 accepted draft tokens + 1 bonus token per round
DEFAULT_TREE_TOPK = 10

# Device types where draft_tree stops expanding once no deeper node can be kept (the test reads a count from the
# device per level: free on a CPU, a sync on a GPU, where fixed shapes are also what graph capture needs).
EARLY_STOP_DEVICES = ("cpu",)


@dataclass
class Tree:
    """A token tree for verification; node 0 is the root (the last committed token). A batch of trees (one per
    row, ``draft_trees``) has a leading batch dim on every field."""
    tokens: torch.Tensor    # [n] int64
    parents: torch.Tensor   # [n] int64, parents[0] = -1, parents[i] < i
    depths: torch.Tensor    # [n] int64, root 0
    mask: torch.Tensor      # [n, n] bool, mask[i, j] = node j is an ancestor of node i or i itself

    @property
    def size(self) -> int:
        return int(self.tokens.shape[-1])


def check_tree_options(total_tokens, depth, top_k) -> None:
    """Raise ValueError naming the offending tree option."""
    for name, v in (("total_tokens", total_tokens), ("depth", depth), ("tree_topk", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if top_k > total_tokens:
        raise ValueError(f"tree_topk ({top_k}) must be <= total_tokens ({total_tokens}): a tree of {total_tokens} "
                         f"nodes cannot hold {top_k} children per node")


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor, max_depth: Optional[int] = None) -> Tree:
    """Depths and the ancestor mask of a tree given by parent pointers (parents[0] = -1, parents[i] < i).

    max_depth: a bound on the depth when the caller knows one (the draft's levels): the walk then runs that many
    steps without reading anything back from the device; without it, it stops when no ancestor is left.
    """
    n = tokens.shape[0]
    dev = tokens.device
    rows = torch.arange(n, device=dev)
    mask = torch.eye(n, dtype=torch.bool, device=dev)
    depths = torch.zeros(n, dtype=torch.long, device=dev)
    anc = parents.clone()
    step = 0
    while max_depth is None or step < max_depth:  # one step per level: mark the current ancestor, go one up
        live = anc >= 0
        if max_depth is None and not bool(live.any()):
            break
        col = anc.clamp(min=0)
        mask[rows, col] |= live                                # no boolean indexing: nothing read back
        depths += live.long()
        anc = torch.where(live, parents[col], anc)
        step += 1
    return Tree(tokens=tokens, parents=parents, depths=depths, mask=mask)


def root_only(root_token: int, device) -> Tree:
    return tree_from_parents(torch.tensor([int(root_token)], device=device),
                             torch.tensor([-1], device=device), max_depth=0)


@torch.inference_mode()
def draft_tree(draft, cache, root_hidden: torch.Tensor, root_token: int, total_tokens: int, depth: int,
               top_k: int, early_stop: Optional[bool] = None) -> Tree:
    """Build the EAGLE-2 dynamic tree (module docstring) below ``root_token``.

    root_hidden: ``[H]`` the draft's output at the last context position (its logits rank level 1).
    cache: the draft's DraftCache holding the accepted context (``cache.length`` entries, positions
        ``0 .. length-1``); level-l nodes sit at draft position ``length + l - 1``.
    early_stop: stop expanding once no deeper node can be kept (the same tree, one read per level); default: on
        ``EARLY_STOP_DEVICES``.
    """
    dev = root_hidden.device
    k = min(top_k, draft.tree_vocab_size)
    n_draft = total_tokens - 1
    if n_draft <= 0 or depth <= 0:
        return root_only(root_token, dev)
    ctx = cache.length
    cache.reserve(ctx + (depth - 1) * k)

    scores, tokens = _top_log_probs(draft, root_hidden, k)  # level 1
    cand_scores, cand_tokens = [scores], [tokens]
    cand_parent = [torch.full((k,), -1, dtype=torch.long, device=dev)]  # candidate index of the parent, -1 = root
    frontier = torch.arange(k, device=dev)                     # candidate indices of the frontier
    hidden = root_hidden.expand(k, -1)
    ids = tokens
    fmask = torch.eye(k, dtype=torch.bool, device=dev)         # frontier x fed-tree-nodes ancestry
    ctx_cols = torch.ones(k, ctx, dtype=torch.bool, device=dev)
    n_cand = k
    if early_stop is None:
        early_stop = dev.type in EARLY_STOP_DEVICES
    for step in range(depth - 1):
        # Exact early stop: a deeper candidate scores at most its frontier ancestor, and loses ties to every
        # earlier candidate; once n_draft candidates score >= the best frontier score, none deeper can be kept.
        if early_stop:
            best_frontier = scores.max()
            if int(sum((s >= best_frontier).sum() for s in cand_scores)) >= n_draft:  # one read per level
                break
        attn_mask = torch.cat([ctx_cols, fmask], dim=1)
        pos = torch.full((1, k), ctx + step, dtype=torch.long, device=dev)
        out = draft(ids[None], hidden[None], position_ids=pos, cache=cache, cache_pos=ctx + step * k,
                    attn_mask=attn_mask)[0]                    # [k, H]
        child_lp, child_tok = _top_log_probs(draft, out, k)    # [k, k]
        child_scores = (child_lp + scores[:, None]).flatten()  # cumulative path log-prob
        cand_scores.append(child_scores)
        cand_tokens.append(child_tok.flatten())
        cand_parent.append(frontier.repeat_interleave(k))
        scores, best = torch.topk(child_scores, k)
        slot = best // k                                       # which frontier node each new one descends from
        frontier = n_cand + best
        n_cand += k * k
        hidden, ids = out[slot], child_tok.flatten()[best]
        fmask = torch.cat([fmask[slot], torch.eye(k, dtype=torch.bool, device=dev)], dim=1)
    return _select(torch.cat(cand_scores), torch.cat(cand_tokens), torch.cat(cand_parent), root_token, n_draft,
                   max_depth=len(cand_scores))


def _top_log_probs(draft, hidden: torch.Tensor, k: int):
    """The k largest draft log-probabilities of each row and their target token ids (top-k of the logits minus the
    log-normaliser: one pass over the vocabulary fewer than a full log_softmax; the results are still <= 0).
    With a hot vocabulary, over its tokens only."""
    logits = draft.tree_logits(hidden).float()
    top, col = torch.topk(logits, k, dim=-1)
    return top - _log_normaliser(logits, top[..., :1]), draft.tree_token_ids(col)


def _log_normaliser(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim given its max. Terms below e^-80 relative to the max are clamped there: they
    change the sum by less than V * e^-80 (far below fp32 resolution) and would otherwise be denormal, which
    makes exp ~40x slower on CPUs (a confident draft has many such logits)."""
    return row_max + (logits - row_max).clamp_(min=-80.0).exp_().sum(-1, keepdim=True).log_()


def _select(scores, tokens, parent, root_token, n_draft, max_depth: Optional[int] = None) -> Tree:
    """Keep the n_draft best candidates (stable ranking: parents first at ties), in candidate order.

    Every kept node's parent is kept (module docstring; tests check it on ties), so nothing is read back here.
    max_depth: the number of draft levels, if known (see tree_from_parents)."""
    dev = scores.device
    n_keep = min(n_draft, scores.shape[0])
    order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    sel = torch.sort(order).values
    par = parent[sel]
    pos = torch.searchsorted(sel, par.clamp(min=0))            # node index - 1 of each kept parent
    node_parent = torch.where(par < 0, torch.zeros_like(pos), pos + 1)
    all_tokens = torch.cat([torch.tensor([int(root_token)], device=dev), tokens[sel]])
    all_parents = torch.cat([torch.tensor([-1], device=dev), node_parent])
    return tree_from_parents(all_tokens, all_parents, max_depth)


# ---- a batch of trees ---------------------------------------------------------------------------------------

def trees_from_parents(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int) -> Tree:
    """``tree_from_parents`` for a batch: tokens, parents ``[B, n]``; depths ``[B, n]``, mask ``[B, n, n]``."""
    B, n = tokens.shape
    mask = torch.eye(n, dtype=torch.bool, device=tokens.device).repeat(B, 1, 1)
    depths = torch.zeros_like(parents)
    anc = parents.clone()
    for _ in range(max_depth):
        live = anc >= 0
        col = anc.clamp(min=0)
        mask.scatter_(2, col[..., None], mask.gather(2, col[..., None]) | live[..., None])
        depths += live.long()
        anc = torch.where(live, parents.gather(1, col), anc)
    return Tree(tokens=tokens, parents=parents, depths=depths, mask=mask)


@torch.inference_mode()
def draft_trees(draft, cache, root_hidden: torch.Tensor, root_tokens: torch.Tensor, lengths: torch.Tensor,
                total_tokens: int, depth: int, top_k: int, early_stop: Optional[bool] = None) -> Tree:
    """``draft_tree`` for a batch of rows whose contexts differ in length: one tree per row, all of
    ``total_tokens`` nodes, built with one draft forward per level for the whole batch.

    root_hidden ``[B, H]``, root_tokens int64 ``[B]``, lengths int64 ``[B]``: row b's context is its draft cache
    entries ``[0, lengths[b])``; ``cache.length`` is the longest (rows are right-padded to it), and level-l nodes
    are written at slots ``cache.length + (l - 1) * k ...`` for every row, each row attending its own context, its
    ancestors and itself. The early stop (one read per level) stops when no row can keep a deeper node.
    """
    dev = root_hidden.device
    B = root_hidden.shape[0]
    k = min(top_k, draft.tree_vocab_size)
    n_draft = total_tokens - 1
    if n_draft <= 0 or depth <= 0:
        return trees_from_parents(root_tokens[:, None], torch.full((B, 1), -1, dtype=torch.long, device=dev), 0)
    ctx = cache.length
    cache.reserve(ctx + (depth - 1) * k)
    scores, tokens = _top_log_probs(draft, root_hidden, k)       # [B, k]
    cand_scores, cand_tokens = [scores], [tokens]
    cand_parent = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
    frontier = torch.arange(k, device=dev).expand(B, k)
    hidden, ids = root_hidden[:, None].expand(B, k, -1), tokens
    eye = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
    fmask = eye
    ctx_cols = (torch.arange(ctx, device=dev) < lengths[:, None])[:, None].expand(B, k, ctx)
    n_cand = k
    if early_stop is None:
        early_stop = dev.type in EARLY_STOP_DEVICES
    for step in range(depth - 1):
        if early_stop:  # as in draft_tree, for every row at once
            best_frontier = scores.max(dim=1, keepdim=True).values
            kept = sum((s >= best_frontier).sum(dim=1) for s in cand_scores)
            if bool((kept >= n_draft).all()):
                break
        attn_mask = torch.cat([ctx_cols, fmask], dim=2)
        pos = (lengths + step)[:, None].expand(B, k)
        out = draft(ids, hidden, position_ids=pos, cache=cache, cache_pos=ctx + step * k, attn_mask=attn_mask)
        child_lp, child_tok = _top_log_probs(draft, out, k)      # [B, k, k]
        child_scores = (child_lp + scores[..., None]).flatten(1)
        cand_scores.append(child_scores)
        cand_tokens.append(child_tok.flatten(1))
        cand_parent.append(frontier.repeat_interleave(k, dim=1))
        scores, best = torch.topk(child_scores, k, dim=1)
        slot = best // k
        frontier = n_cand + best
        n_cand += k * k
        hidden = out.gather(1, slot[..., None].expand(B, k, out.shape[-1]))
        ids = child_tok.flatten(1).gather(1, best)
        fmask = torch.cat([fmask.gather(1, slot[..., None].expand(B, k, fmask.shape[-1])), eye], dim=2)
    return _select_batch(torch.cat(cand_scores, 1), torch.cat(cand_tokens, 1), torch.cat(cand_parent, 1),
                         root_tokens, n_draft, max_depth=len(cand_scores))


def _select_batch(scores, tokens, parent, root_tokens, n_draft, max_depth: int) -> Tree:
    """``_select`` row by row: each row keeps its n_draft best candidates (stable: parents first at ties)."""
    n_keep = min(n_draft, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_keep]
    sel = torch.sort(order, dim=1).values
    par = parent.gather(1, sel)
    pos = torch.searchsorted(sel, par.clamp(min=0))
    node_parent = torch.where(par < 0, torch.zeros_like(pos), pos + 1)
    all_tokens = torch.cat([root_tokens[:, None], tokens.gather(1, sel)], dim=1)
    all_parents = torch.cat([torch.full_like(node_parent[:, :1], -1), node_parent], dim=1)
    return trees_from_parents(all_tokens, all_parents, max_depth)
