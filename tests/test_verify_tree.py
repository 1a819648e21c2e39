"""hass_ext.ops.verify_tree: exact greedy cases, agreement with the oracle under a shared random stream,
distribution tests against the analytic target distribution, bad input. GPU tests skip without CUDA."""
import pytest
import torch

import hass_ext
from hass_ext.ops import verify_tree
from hass_ext.reference import verify_tree_reference
from hass_ext.sampling import filtered_probs

CUDA = "cuda" in hass_ext.available_devices()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext built with CUDA kernels")

CHAIN = [-1, 0, 1, 2, 3]
STAR = [-1, 0, 0, 0, 0, 0]
DEEP = [-1, 0, 0, 1, 1, 2, 3, 3, 6, 8, 4, 0]  # branches at several depths, a leaf at depth 5


def _logits_with_argmax(rows, V, argmax, ties=()):
    """[n, V] logits whose row i has its (unique unless tied) maximum at argmax[i]; ties adds equal maxima."""
    g = torch.Generator().manual_seed(len(rows) * 131 + V)
    z = torch.randn(len(rows), V, generator=g)
    for i, a in enumerate(argmax):
        z[i, a] = 10.0
    for i, t in ties:
        z[i, t] = 10.0
    return z


def _run(logits, tokens, parents, **kw):
    out = verify_tree(logits, torch.tensor(tokens), torch.tensor(parents), **kw)
    return [t.tolist() for t in out]


# ---- greedy: exact ----------------------------------------------------------------------------------------

def test_greedy_chain_accepts_prefix():
    V = 32
    tokens = [0, 5, 7, 9, 11]
    am = [5, 7, 9, 3, 30]  # node 3 predicts 3, the draft has 11 -> path 0,1,2,3 and next = 3
    acc, alen, nxt = _run(_logits_with_argmax(CHAIN, V, am), tokens, CHAIN)
    assert acc == [0, 1, 2, 3, -1] and alen == 3 and nxt == 3


def test_greedy_full_chain_takes_bonus_from_leaf():
    V = 16
    acc, alen, nxt = _run(_logits_with_argmax(CHAIN, V, [1, 2, 3, 4, 15]), [0, 1, 2, 3, 4], CHAIN)
    assert acc == [0, 1, 2, 3, 4] and alen == 4 and nxt == 15


def test_greedy_star_picks_matching_child_and_first_duplicate():
    V = 20
    tokens = [0, 3, 8, 8, 4, 6]  # nodes 2 and 3 carry the same token: the first in node order wins
    am = [8, 0, 12, 13, 0, 0]
    acc, alen, nxt = _run(_logits_with_argmax(STAR, V, am), tokens, STAR)
    assert acc == [0, 2, -1, -1, -1, -1] and alen == 1 and nxt == 12


def test_greedy_no_match_rejects_all():
    V = 20
    acc, alen, nxt = _run(_logits_with_argmax(STAR, V, [19, 0, 0, 0, 0, 0]), [0, 1, 2, 3, 4, 5], STAR)
    assert acc == [0, -1, -1, -1, -1, -1] and alen == 0 and nxt == 19


def test_greedy_deep_branch():
    V = 40
    # root -> node 2 (token 21) -> node 5 (token 22); node 1 (token 20) is a sibling that does not match.
    tokens = [0, 20, 21, 30, 31, 22, 32, 33, 34, 35, 36, 37]
    am = [21, 30, 22, 0, 0, 39, 0, 0, 0, 0, 0, 0]
    acc, alen, nxt = _run(_logits_with_argmax(DEEP, V, am), tokens, DEEP)
    assert acc[:3] == [0, 2, 5] and alen == 2 and nxt == 39
    # and along the deepest branch 0 -> 1 -> 3 -> 6 -> 8 -> 9
    tokens = [0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    am = [20, 22, 0, 25, 0, 0, 27, 0, 28, 11, 0, 0]
    acc, alen, nxt = _run(_logits_with_argmax(DEEP, V, am), tokens, DEEP)
    assert acc[:6] == [0, 1, 3, 6, 8, 9] and alen == 5 and nxt == 11


def test_greedy_ties_go_to_lowest_token_id():
    V = 10
    # root's maximum is shared by tokens 7 and 4: the argmax is 4, so the child with token 4 is followed.
    logits = _logits_with_argmax(STAR, V, [7, 2, 2, 5, 2, 2], ties=[(0, 4), (3, 1)])
    acc, alen, nxt = _run(logits, [0, 7, 9, 4, 1, 2], STAR)
    assert acc[:2] == [0, 3] and alen == 1 and nxt == 1  # node 3 ties 5 and 1 -> 1


def test_greedy_single_node_tree():
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0]])
    acc, alen, nxt = _run(logits, [0], [-1])
    assert acc == [0] and alen == 0 and nxt == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_matches_oracle_random(dtype):
    g = torch.Generator().manual_seed(7)
    B, n, V = 33, 23, 97
    parents = _random_trees(B, n, g)
    logits = (torch.randn(B, n, V, generator=g) * 3).to(dtype)
    tokens = _likely_tokens(logits, parents, g)
    got = verify_tree(logits, tokens, parents)
    want = verify_tree_reference(logits, tokens, parents)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[1].float().mean() > 0.5  # the drafts are mostly the argmax: long paths are exercised


# ---- sampling: agreement with the oracle under a shared random stream ----------------------------------

def _random_trees(B, n, g):
    """Random trees in node order: parents[i] uniform in [max(0, i-5), i)."""
    parents = torch.empty(B, n, dtype=torch.int64)
    parents[:, 0] = -1
    for i in range(1, n):
        lo = max(0, i - 5)
        parents[:, i] = torch.randint(lo, i, (B,), generator=g)
    return parents


def _likely_tokens(logits, parents, g, p_likely=0.6):
    """Draft tokens: mostly the parent's argmax, else random (often unlikely) tokens, some repeated."""
    B, n, V = logits.shape
    tokens = torch.randint(0, V, (B, n), generator=g)
    for i in range(1, n):
        par_logits = logits[torch.arange(B), parents[:, i]].float()
        pick = torch.rand(B, generator=g) < p_likely
        tokens[pick, i] = par_logits[pick].argmax(-1)
    return tokens


SAMPLING_CASES = [
    (1.0, 1.0, 0), (0.5, 1.0, 0), (1.5, 1.0, 0), (1.0, 0.9, 0), (0.7, 0.5, 0), (1.0, 1.0, 5), (1.3, 0.8, 8),
    (1.0, 1.0, 1), (2.0, 0.05, 0), (1e-4, 1.0, 0),
]


@pytest.mark.parametrize("temperature,top_p,top_k", SAMPLING_CASES)
def test_sampling_matches_oracle_shared_stream(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(int(temperature * 1000) + int(top_p * 100) + top_k)
    B, n, V = 48, 17, 211
    parents = _random_trees(B, n, g)
    logits = torch.randn(B, n, V, generator=g) * 2.5
    logits[:, :, :7] = float("-inf")  # masked tokens (probability 0) are allowed
    tokens = _likely_tokens(logits, parents, g)
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    got = verify_tree(logits, tokens, parents, temperature, top_p, top_k,
                      generator=torch.Generator().manual_seed(seed))
    want = verify_tree_reference(logits, tokens, parents, temperature, top_p, top_k,
                                 generator=torch.Generator().manual_seed(seed))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[2] >= 7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_half_dtypes_match_oracle(dtype):
    g = torch.Generator().manual_seed(11)
    B, n, V = 40, 9, 300
    parents = _random_trees(B, n, g)
    logits = (torch.randn(B, n, V, generator=g) * 2).to(dtype)
    tokens = _likely_tokens(logits, parents, g)
    u = torch.rand(B, n, generator=g)
    got = verify_tree(logits, tokens, parents, 0.8, 0.9, 20, uniforms=u)
    want = verify_tree_reference(logits, tokens, parents, 0.8, 0.9, 20, uniforms=u)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_same_seed_same_result_and_unbatched_form():
    g = torch.Generator().manual_seed(3)
    B, n, V = 20, 11, 64
    parents = _random_trees(B, n, g)
    logits = torch.randn(B, n, V, generator=g)
    tokens = _likely_tokens(logits, parents, g)
    runs = [verify_tree(logits, tokens, parents, 1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    other = verify_tree(logits, tokens, parents, 1.0, generator=torch.Generator().manual_seed(6))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], other))
    u = torch.rand(B, n, generator=g)
    full = verify_tree(logits, tokens, parents, 0.9, 0.95, 9, uniforms=u)
    one = verify_tree(logits[4], tokens[4], parents[4], 0.9, 0.95, 9, uniforms=u[4])
    assert one[0].shape == (n,) and one[1].dim() == 0
    assert torch.equal(one[0], full[0][4]) and int(one[1]) == int(full[1][4]) and int(one[2]) == int(full[2][4])


def test_strided_logits_and_broadcast_rows():
    g = torch.Generator().manual_seed(4)
    n, V = 6, 40
    base = torch.randn(1, n, V, generator=g)
    logits = base.expand(50, n, V)  # stride 0 over the batch
    parents = torch.tensor(STAR).expand(50, n)
    tokens = torch.randint(0, V, (50, n), generator=g)
    u = torch.rand(50, n, generator=g)
    got = verify_tree(logits, tokens, parents, 1.0, uniforms=u)
    want = verify_tree_reference(logits.contiguous(), tokens, parents, 1.0, uniforms=u)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    wide = torch.randn(3, n, 2 * V, generator=g)[:, :, ::2]  # last dim not contiguous: copied
    got = verify_tree(wide, tokens[:3], parents[:3], 0.0)
    want = verify_tree_reference(wide.contiguous(), tokens[:3], parents[:3], 0.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_fake_impl_and_opcheck():
    g = torch.Generator().manual_seed(8)
    B, n, V = 3, 5, 17
    parents = _random_trees(B, n, g)
    logits = torch.randn(B, n, V, generator=g)
    tokens = torch.randint(0, V, (B, n), generator=g)
    u = torch.rand(B, n, generator=g)
    torch.library.opcheck(torch.ops.hass.verify_tree.default, (logits, tokens, parents, 1.0, 0.9, 4, u, None))
    torch.library.opcheck(torch.ops.hass.verify_tree.default, (logits, tokens, parents, 0.0, 1.0, 0, None, None))
