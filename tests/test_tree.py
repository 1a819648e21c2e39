"""The EAGLE-2 dynamic tree: structure helpers, the batched expansion against a per-path brute force, selection."""
import pytest
import torch

from hass_ext.draft import DraftConfig, DraftModel
from hass_ext.tree import _select, check_tree_options, draft_tree, tree_from_parents



def test_tree_from_parents_reference_example():
    """The worked example of the reference (k=3, depth 2, 8 nodes)."""
    parents = torch.tensor([-1, 0, 0, 1, 2, 4, 4, 3])
    t = tree_from_parents(torch.arange(8), parents)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 1, 0, 0, 0],
                             [1, 0, 1, 0, 1, 1, 0, 0],
                             [1, 0, 1, 0, 1, 0, 1, 0],
                             [1, 1, 0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.mask, expected)
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]


def _draft(vocab=40, hidden=32, seed=0, head_scale=1.0):
    torch.manual_seed(seed)
    d = DraftModel(DraftConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_attention_heads=4,
                               num_key_value_heads=2, rope_theta=1000.0))
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    d.set_lm_head(torch.randn(vocab, hidden) * head_scale)
    return d.eval()


def _brute_force_tree(draft, ctx_ids, ctx_feats, root, total_tokens, depth, k):
    """EAGLE-2 written node by node: every node's draft output comes from a plain causal forward over the context
    followed by its own root-to-node path (no cache, no tree mask)."""
    def path_forward(path_tokens, path_feats):
        ids = torch.cat([ctx_ids, torch.tensor([path_tokens])], 1)
        feats = torch.cat([ctx_feats, torch.stack(path_feats)[None]], 1)
        return draft(ids, feats)[0, -1]

    with torch.no_grad():
        root_out = draft(ctx_ids, ctx_feats)[0, -1]
        cands = []  # (score, token, parent candidate index, path tokens, path feats)
        lp = torch.log_softmax(draft.logits(root_out), -1)
        s, t = torch.topk(lp, k)
        frontier = []
        for j in range(k):
            cands.append((float(s[j]), int(t[j]), -1, [int(t[j])], [root_out]))
            frontier.append(len(cands) - 1)
        for _ in range(depth - 1):
            children = []
            for f in frontier:
                score, tok, _, ptoks, pfeats = cands[f]
                out = path_forward(ptoks, pfeats)
                lp = torch.log_softmax(draft.logits(out), -1)
                cs, ct = torch.topk(lp, k)
                for j in range(k):
                    cands.append((score + float(cs[j]), int(ct[j]), f, ptoks + [int(ct[j])], pfeats + [out]))
                    children.append(len(cands) - 1)
            frontier = sorted(children, key=lambda c: -cands[c][0])[:k]
        order = sorted(range(len(cands)), key=lambda c: (-cands[c][0], c))[: total_tokens - 1]
        sel = sorted(order)
        node_of = {c: i + 1 for i, c in enumerate(sel)}
        tokens = [root] + [cands[c][1] for c in sel]
        parents = [-1] + [0 if cands[c][2] < 0 else node_of[cands[c][2]] for c in sel]
    return tokens, parents


def tree_after_random_context(draft, g, L, total_tokens, depth, k, root=7):
    """The draft tree (root token ``root``) after a random context of L tokens/features drawn from ``g``."""
    ctx_ids, ctx_feats = torch.randint(0, 40, (1, L), generator=g), torch.randn(1, L, 32, generator=g)
    cache = draft.new_cache(capacity=4)
    with torch.no_grad():
        root_hidden = draft(ctx_ids, ctx_feats, cache=cache)[0, -1]
    cache.length = L
    return draft_tree(draft, cache, root_hidden, root, total_tokens, depth, k), cache, ctx_ids, ctx_feats


@pytest.mark.parametrize("total_tokens,depth,k,seed,scale", [
    (60, 6, 10, 0, 1.0), (8, 3, 2, 1, 1.0), (12, 4, 3, 2, 1.0), (7, 6, 1, 3, 1.0), (1, 6, 1, 4, 1.0),
    (30, 1, 5, 5, 1.0), (200, 3, 4, 6, 1.0),
    (60, 6, 10, 7, 4.0), (25, 6, 3, 8, 6.0)])  # peaked drafts: deep trees, the early stop rarely fires
def test_draft_tree_matches_brute_force(total_tokens, depth, k, seed, scale):
    draft = _draft(seed=seed, head_scale=scale)
    L = 9
    tree, cache, ctx_ids, ctx_feats = tree_after_random_context(draft, torch.Generator().manual_seed(seed), L,
                                                                total_tokens, depth, k)
    tokens, parents = _brute_force_tree(draft, ctx_ids, ctx_feats, 7, total_tokens, depth, k)
    assert tree.tokens.tolist() == tokens
    assert tree.parents.tolist() == parents
    assert cache.length == L  # tree nodes are not context
    n_candidates = k + (depth - 1) * k * k
    assert tree.size == min(total_tokens - 1, n_candidates) + 1
    assert int(tree.depths.max()) <= depth
    if scale > 1:
        assert int(tree.depths.max()) >= 4, "a peaked draft should give a deep tree"
    if k == 1 and total_tokens > depth:  # a chain
        assert parents == [-1] + list(range(depth))


@pytest.mark.parametrize("total_tokens,depth,k,seed,scale", [(60, 6, 10, 0, 1.0), (8, 3, 2, 1, 1.0),
                                                               (25, 6, 3, 8, 6.0), (40, 6, 4, 9, 0.2)])
def test_early_stop_gives_the_same_tree(total_tokens, depth, k, seed, scale):
    """The early stop (CPU) only skips levels none of whose nodes could be kept: the tree every level gives."""
    draft = _draft(seed=seed, head_scale=scale)
    trees = []
    for early_stop in (True, False):
        g = torch.Generator().manual_seed(seed)
        ctx_ids, ctx_feats = torch.randint(0, 40, (1, 9), generator=g), torch.randn(1, 9, 32, generator=g)
        cache = draft.new_cache(capacity=4)
        with torch.no_grad():
            root_hidden = draft(ctx_ids, ctx_feats, cache=cache)[0, -1]
        trees.append(draft_tree(draft, cache, root_hidden, 7, total_tokens, depth, k, early_stop=early_stop))
    assert torch.equal(trees[0].tokens, trees[1].tokens) and torch.equal(trees[0].parents, trees[1].parents)
    assert torch.equal(trees[0].mask, trees[1].mask) and torch.equal(trees[0].depths, trees[1].depths)


def test_selection_is_parent_closed_under_ties():
    """docs/algorithms.md#p5-tree-ties: with equal scores everywhere (a draft sure of every token), any selection size keeps parents."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        m = int(torch.randint(2, 60, (1,), generator=g))
        parent = torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, m)])
        scores = torch.zeros(m)
        n_draft = int(torch.randint(1, m + 1, (1,), generator=g))
        tree = _select(scores, torch.arange(m), parent, 99, n_draft)
        p = tree.parents
        assert tree.size == n_draft + 1
        assert bool((p[1:] < torch.arange(1, tree.size)).all()) and bool((p[1:] >= 0).all())


def test_peaked_draft_ties_keep_parents():
    """A draft whose top token has probability exactly 1 gives children the parent's score."""
    draft = _draft(seed=7, head_scale=1e4)
    cache = draft.new_cache()
    with torch.no_grad():
        ids, f = torch.randint(0, 40, (1, 5)), torch.randn(1, 5, 32)
        root_hidden = draft(ids, f, cache=cache)[0, -1]
    cache.length = 5
    tree = draft_tree(draft, cache, root_hidden, 3, 20, 6, 3)
    lp = torch.log_softmax(draft.logits(root_hidden), -1)
    assert float(lp.max()) == 0.0  # the tie the guard is about
    assert bool((tree.parents[1:] < torch.arange(1, tree.size)).all())


def test_tree_options_errors():
    check_tree_options(60, 6, 10)
    check_tree_options(1, 1, 1)
    with pytest.raises(ValueError, match=r"tree_topk \(11\) must be <= total_tokens \(10\)"):
        check_tree_options(10, 6, 11)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        check_tree_options(60, 0, 10)
    with pytest.raises(ValueError, match="total_tokens must be an int >= 1"):
        check_tree_options(0, 6, 10)
    with pytest.raises(ValueError, match="tree_topk must be an int >= 1"):
        check_tree_options(60, 6, 2.5)
