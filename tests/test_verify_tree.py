"""hass_ext.ops.verify_tree: exact greedy cases, agreement with the oracle under a shared random stream,
distribution tests against the analytic target distribution, bad input. GPU tests skip without CUDA."""
import pytest
import torch

import hass_ext
from hass_ext.ops import verify_tree
from hass_ext.oracles import verify_tree_oracle
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
    want = verify_tree_oracle(logits, tokens, parents)
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
    want = verify_tree_oracle(logits, tokens, parents, temperature, top_p, top_k,
                              generator=torch.Generator().manual_seed(seed))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[2] >= 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.8, 0.9, 50)])
def test_large_vocabulary_matches_oracle(dtype, temperature, top_p, top_k):
    """V = 262144 (the largest vocabularies in use): the streamed statistics still agree with the oracle."""
    g = torch.Generator().manual_seed(5)
    B, n, V = 2, 6, 262144
    parents = _random_trees(B, n, g)
    logits = (torch.randn(B, n, V, generator=g) * 3).to(dtype)
    logits[:, :, V - 1] = 30.0  # the most likely token, at the very end of the vocabulary
    tokens = _likely_tokens(logits, parents, g)
    u = torch.rand(B, n, generator=g)
    got = verify_tree(logits, tokens, parents, temperature, top_p, top_k, uniforms=u)
    want = verify_tree_oracle(logits, tokens, parents, temperature, top_p, top_k, uniforms=u)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if temperature == 0:
        assert (got[2] == V - 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_half_dtypes_match_oracle(dtype):
    g = torch.Generator().manual_seed(11)
    B, n, V = 40, 9, 300
    parents = _random_trees(B, n, g)
    logits = (torch.randn(B, n, V, generator=g) * 2).to(dtype)
    tokens = _likely_tokens(logits, parents, g)
    u = torch.rand(B, n, generator=g)
    got = verify_tree(logits, tokens, parents, 0.8, 0.9, 20, uniforms=u)
    want = verify_tree_oracle(logits, tokens, parents, 0.8, 0.9, 20, uniforms=u)
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
    want = verify_tree_oracle(logits.contiguous(), tokens, parents, 1.0, uniforms=u)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    wide = torch.randn(3, n, 2 * V, generator=g)[:, :, ::2]  # last dim not contiguous: copied
    got = verify_tree(wide, tokens[:3], parents[:3], 0.0)
    want = verify_tree_oracle(wide.contiguous(), tokens[:3], parents[:3], 0.0)
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


# ---- distribution: the first and second emitted tokens follow the target exactly ------------------------
#
# A synthetic Markov target over V = 8 tokens: the logits after token t at depth d are table[d, t], every row
# a permutation of BASE (a tie for the top-k/top-p boundaries and a -inf token). A fixed multi-level tree is
# drafted from that target with likely, unlikely, impossible (probability 0 after filtering), medium-leaf and
# repeated-token children. Each of N = 100000 rows verifies the same tree with its own randomness (one call);
# the first emitted token is accepted[1]'s token (or next_token), the second accepted[2]'s, next_token after
# one accepted token, or, when nothing was accepted, the first token of a second round rooted at the first.
# The joint distribution of the two must be p0(t1) * p1(t2 | t1) (sampling.filtered_probs): cells of
# probability 0 must never occur, and Pearson's chi-square over the others (expected counts < 5 pooled) must
# have p > 1e-4. Seeds are fixed, so the outcome is deterministic; broken variants (residual not excluding the
# rejected tokens, no renormalisation after a rejection, the bonus token ignoring top-k/top-p) give p < 1e-50.

DIST_V = 8
DIST_BASE = torch.tensor([2.0, 1.5, 1.0, 1.0, 0.3, -0.5, -1.2, float("-inf")])
DIST_TREE = [-1, 0, 0, 0, 0, 1, 1, 5, 2, 3, 0, 2]
DIST_DEPTH = [0]
for _i in range(1, len(DIST_TREE)):
    DIST_DEPTH.append(DIST_DEPTH[DIST_TREE[_i]] + 1)
CHI2_MIN_P = 1e-4


def _dist_table(seed=1):
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(max(DIST_DEPTH) + 3, DIST_V, DIST_V, generator=g), dim=-1)
    return DIST_BASE[perm]


def _dist_tree_tokens(table, T, top_p, top_k):
    """Draft tokens: [root, likely, unlikely, impossible, medium (leaf), ..., repeat of likely, ...]."""
    def ranked(depth, token):
        p = filtered_probs(table[depth, token], T, top_p, top_k)
        order = torch.argsort(p, descending=True, stable=True)
        return p, order, int((p > 0).sum())

    p0, order, kept = ranked(0, 0)
    impossible = int(torch.nonzero(p0 == 0)[0])
    tokens = [0, int(order[0]), int(order[kept - 1]), impossible, int(order[1]), 0, 0, 0, 0, 3, int(order[0]), 0]
    for node, parent, rank in ((5, 1, 0), (6, 1, -1), (7, 5, 0), (8, 2, 0), (11, 2, -1)):
        _, o, k = ranked(DIST_DEPTH[parent], tokens[parent])
        tokens[node] = int(o[0] if rank == 0 else o[k - 1])
    return tokens


def _dist_round(table, depth0, roots, tokens, T, top_p, top_k, generator, device):
    B, n = roots.shape[0], len(DIST_TREE)
    tok = torch.tensor(tokens).expand(B, n).clone()
    tok[:, 0] = roots
    logits = table[depth0 + torch.tensor(DIST_DEPTH)[None, :], tok]
    parents = torch.tensor(DIST_TREE).expand(B, n)
    out = verify_tree(logits.to(device), tok.to(device), parents.to(device), T, top_p, top_k, generator=generator)
    acc, alen, nxt = (t.cpu() for t in out)
    path_tok = torch.gather(tok, 1, acc.clamp(min=0))
    return path_tok, alen, nxt


def _emitted_pairs(table, T, top_p, top_k, N, generator, device="cpu"):
    tokens = _dist_tree_tokens(table, T or 1.0, top_p, top_k)  # greedy: drafted as at T = 1
    path, alen, nxt = _dist_round(table, 0, torch.zeros(N, dtype=torch.int64), tokens, T, top_p, top_k, generator,
                                  device)
    t1 = torch.where(alen >= 1, path[:, 1], nxt)
    t2 = torch.where(alen >= 2, path[:, 2], nxt)
    redo = alen == 0
    path2, alen2, nxt2 = _dist_round(table, 1, t1[redo], tokens, T, top_p, top_k, generator, device)
    t2[redo] = torch.where(alen2 >= 1, path2[:, 1], nxt2)
    return t1, t2, alen


def _chi2_against(counts, probs):
    """(count in zero-probability cells, chi-square p-value over the others with small cells pooled)."""
    from scipy import stats

    counts, probs = counts.double(), probs.double()
    zero = probs == 0
    n = counts[~zero].sum()
    expected = probs * n / probs.sum()
    big = expected >= 5
    obs = [counts[big], counts[~big & ~zero].sum().reshape(1)]
    exp = [expected[big], expected[~big & ~zero].sum().reshape(1)]
    obs, exp = torch.cat(obs), torch.cat(exp)
    keep = exp > 0
    return int(counts[zero].sum()), float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


DIST_CASES = [(0.5, 1.0, 0), (1.0, 1.0, 0), (1.5, 1.0, 3), (1.0, 0.8, 0), (1.0, 0.9, 0), (1.5, 0.5, 6),
              (0.5, 0.95, 5)]


def _check_emitted_distribution(T, top_p, top_k, generator, device="cpu", N=100_000):
    table = _dist_table()
    t1, t2, alen = _emitted_pairs(table, T, top_p, top_k, N, generator, device)
    p0 = filtered_probs(table[0, 0], T, top_p, top_k).double()
    p1 = filtered_probs(table[1], T, top_p, top_k).double()  # [t1, t2]
    joint = (p0[:, None] * p1).flatten()
    bad1, pv1 = _chi2_against(torch.bincount(t1, minlength=DIST_V), p0)
    bad2, pv2 = _chi2_against(torch.bincount(t1 * DIST_V + t2, minlength=DIST_V ** 2), joint)
    tv = 0.5 * (torch.bincount(t1 * DIST_V + t2, minlength=DIST_V ** 2).double() / N - joint).abs().sum()
    msg = f"T={T} top_p={top_p} top_k={top_k}: first p={pv1:.3g}, joint p={pv2:.3g}, TV={tv:.4f}"
    assert bad1 == 0 and bad2 == 0, f"tokens of probability 0 were emitted ({bad1}, {bad2}); {msg}"
    assert pv1 > CHI2_MIN_P and pv2 > CHI2_MIN_P, msg
    assert 0.5 < float(alen.float().mean()) < 3.0  # the walk really goes deep and really rejects


@pytest.mark.parametrize("temperature,top_p,top_k", DIST_CASES)
def test_emitted_distribution_matches_target(temperature, top_p, top_k):
    _check_emitted_distribution(temperature, top_p, top_k, torch.Generator().manual_seed(2024))


def test_distribution_check_has_power():
    """The check above rejects the classic bug of drawing the bonus token without top-k/top-p (docs/algorithms.md#p4-bonus-token)."""
    table = _dist_table()
    T, top_p, top_k = 1.0, 0.8, 0
    g = torch.Generator().manual_seed(1)
    p_raw = torch.softmax(table[1] / T, dim=-1)  # [t1, t2] without the filter
    p0 = filtered_probs(table[0, 0], T, top_p, top_k)
    t1 = torch.multinomial(p0, 100_000, replacement=True, generator=g)
    t2 = torch.multinomial(p_raw[t1], 1, generator=g)[:, 0]
    joint = (p0[:, None] * filtered_probs(table[1], T, top_p, top_k)).flatten()
    bad, pv = _chi2_against(torch.bincount(t1 * DIST_V + t2, minlength=DIST_V ** 2), joint)
    assert bad > 0 or pv < CHI2_MIN_P


def test_greedy_emits_the_argmax_chain():
    table = _dist_table()
    t1, t2, alen = _emitted_pairs(table, 0.0, 1.0, 0, 50, None)
    a1 = int(torch.argmax(table[0, 0]))
    assert (t1 == a1).all() and (t2 == int(torch.argmax(table[1, a1]))).all()
    assert (alen >= 2).all()  # the likely drafts are the argmax chain


# ---- bad input --------------------------------------------------------------------------------------------

def _ok_inputs(B=2, n=5, V=11):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, n, V, generator=g), torch.randint(0, V, (B, n), generator=g), torch.tensor(
        [[-1, 0, 0, 1, 2]] * B)


@pytest.mark.parametrize("bad_parents", [[-1, 0, 2, 1, 2], [-1, 0, 0, 3, 2], [0, 0, 0, 1, 2], [-1, -1, 0, 1, 2],
                                         [-1, 0, 0, 1, -1]])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parents_not_a_tree(bad_parents, temperature):
    logits, tokens, parents = _ok_inputs()
    parents[1] = torch.tensor(bad_parents)
    with pytest.raises(ValueError, match=r"parents\[1\] is not a tree"):
        verify_tree(logits, tokens, parents, temperature)


@pytest.mark.parametrize("bad_token", [-1, 11, 10**9])
def test_token_ids_out_of_range(bad_token):
    logits, tokens, parents = _ok_inputs()
    tokens[0, 3] = bad_token
    with pytest.raises(ValueError, match=r"draft_tokens\[0\] holds a token id outside \[0, 11\)"):
        verify_tree(logits, tokens, parents, 1.0)
    tokens[0, 3] = 2
    tokens[0, 0] = -5  # entry 0 (the root) is ignored
    verify_tree(logits, tokens, parents, 1.0)


def test_float_token_ids_are_refused():
    logits, tokens, parents = _ok_inputs()
    with pytest.raises(ValueError, match="draft_tokens holds token ids and must be an int64 tensor, got .*float32"):
        verify_tree(logits, tokens.float(), parents)
    with pytest.raises(ValueError, match="draft_tokens holds token ids and must be an int64 tensor"):
        verify_tree(logits[0], tokens[0].double(), parents[0])


def test_shape_dtype_device_mismatch():
    logits, tokens, parents = _ok_inputs()
    with pytest.raises(ValueError, match="target_logits must have 2 or 3 dims"):
        verify_tree(logits[None], tokens, parents)
    with pytest.raises(ValueError, match="target_logits must have dtype"):
        verify_tree(logits.double(), tokens, parents)
    with pytest.raises(ValueError, match="target_logits must have dtype"):
        verify_tree(logits.long(), tokens, parents)
    with pytest.raises(ValueError, match=r"draft_tokens must have shape \(2, 5\)"):
        verify_tree(logits, tokens[:, :4], parents)
    with pytest.raises(ValueError, match=r"parents must have shape \(2, 5\)"):
        verify_tree(logits, tokens, parents[:1])
    with pytest.raises(ValueError, match="draft_tokens must have 2 dims"):
        verify_tree(logits, tokens[0], parents)
    with pytest.raises(ValueError, match="parents must have dtype torch.int64"):
        verify_tree(logits, tokens, parents.int())
    with pytest.raises(ValueError, match="draft_tokens must be on cpu"):
        verify_tree(logits, tokens.to("meta"), parents)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        verify_tree(logits, tokens, parents, 1.0, uniforms=torch.rand(2, 4))
    with pytest.raises(ValueError, match="uniforms must have dtype"):
        verify_tree(logits, tokens, parents, 1.0, uniforms=torch.rand(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        verify_tree(logits, tokens, parents, 1.0, uniforms=torch.ones(2, 5))
    with pytest.raises(ValueError, match="needs at least one node"):
        verify_tree(logits[:, :0], tokens[:, :0], parents[:, :0])
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        verify_tree(logits, tokens, parents, 1.0, generator=123)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(temperature=1e-40), r"temperature must be 0 \(greedy\) or at least 1e-06"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), "top_k must be an int >= 0"),
])
def test_bad_sampling_arguments(kwargs, match):
    logits, tokens, parents = _ok_inputs()
    with pytest.raises(ValueError, match=match):
        verify_tree(logits, tokens, parents, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_and_inf_logits_on_the_path_are_errors(bad, temperature):
    logits, tokens, parents = _ok_inputs()
    logits[1, 0, 4] = bad  # the root is always on the path
    with pytest.raises(ValueError, match=r"target_logits\[1, 0\] .*contains NaN or \+Inf"):
        verify_tree(logits, tokens, parents, temperature)


def test_non_finite_rule_is_per_visited_row():
    """Documented rule: only rows of nodes the walk visits are checked; -inf is probability 0; a visited row
    with no finite logit is an error."""
    logits, tokens, parents = _ok_inputs(B=1)
    logits[0, 0] = float("-inf")
    logits[0, 0, 3] = 1.0
    tokens[0, 1:] = torch.tensor([5, 6, 7, 8])  # never the root's argmax (3): only the root is visited
    logits[0, 2:, :] = float("nan")            # garbage in unvisited rows is not read
    acc, alen, nxt = verify_tree(logits, tokens, parents, 0.0)
    assert int(alen) == 0 and int(nxt) == 3
    acc, alen, nxt = verify_tree(logits, tokens, parents, 1.0, generator=torch.Generator().manual_seed(0))
    assert int(alen) == 0 and int(nxt) == 3  # every other root token has probability 0
    logits[0, 0, 3] = float("-inf")
    with pytest.raises(ValueError, match="no finite logit"):
        verify_tree(logits, tokens, parents, 1.0)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------

def _cuda_inputs(B, n, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    parents = _random_trees(B, n, g)
    logits = (torch.randn(B, n, V, generator=g) * 3).to(dtype)
    logits[:, :, V // 3] = float("-inf")
    tokens = _likely_tokens(logits, parents, g, p_likely=0.7)
    return logits, tokens, parents, torch.rand(B, n, generator=g)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,n,V", [(5, 9, 1000), (3, 60, 128256), (2, 16, 49152), (4, 1, 77), (2, 7, 3)])
def test_cuda_greedy_matches_cpu(dtype, B, n, V):
    logits, tokens, parents, _ = _cuda_inputs(B, n, V, dtype, seed=B * n + V)
    want = verify_tree(logits, tokens, parents)
    got = verify_tree(logits.cuda(), tokens.cuda(), parents.cuda())
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p,top_k", SAMPLING_CASES)
@pytest.mark.parametrize("V", [257, 50000])
def test_cuda_sampling_matches_cpu_with_shared_uniforms(dtype, temperature, top_p, top_k, V):
    logits, tokens, parents, u = _cuda_inputs(16, 13, V, dtype, seed=V + top_k)
    want = verify_tree(logits, tokens, parents, temperature, top_p, top_k, uniforms=u)
    got = verify_tree(logits.cuda(), tokens.cuda(), parents.cuda(), temperature, top_p, top_k, uniforms=u.cuda())
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def _filter_stress_rows(kind, B, V, g):
    """[B, 1, V] logits that stress the radix filters: many exact ties, or one value everywhere (every logit
    in one radix digit at every level, masses far past 32 bits per digit), or a top group whose mass hits a
    top-p target exactly."""
    if kind == "quantized":  # 17 distinct values: the k-th largest and the top-p boundary sit inside tie groups
        return (torch.randint(-8, 9, (B, 1, V), generator=g) * 0.5).float()
    if kind == "constant":
        return torch.full((B, 1, V), 1.25)
    if kind == "groups":  # a top group of 4 equal logits holding exactly half the mass (the rest far below)
        z = torch.full((B, 1, V), float("-inf"))
        z[:, :, :V // 2] = -200.0
        idx = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(B)])
        z.scatter_(2, idx[:, None, :4], 3.0)
        z.scatter_(2, idx[:, None, 4:], 3.0 - 0.6931471805599453)  # 4 tokens of half the weight: 1/3 of the mass
        return z
    raise ValueError(kind)


def _filter_stress_uniforms(B, g):
    u = torch.rand(B, 1, generator=g)
    u[0, 0], u[1, 0], u[2, 0] = 0.0, 1.0 - 2.0 ** -24, 0.5  # the draw's both ends and the middle
    return u


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,V", [("quantized", 1000), ("quantized", 128256), ("constant", 128256),
                                    ("groups", 4099)])
@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (2 / 3, 0), (1.0, 1), (1.0, 37), (1.0, 4),
                                         (0.75, 1000), (0.999, 0)])
def test_cuda_filters_match_cpu_on_ties_and_boundaries(dtype, kind, V, top_p, top_k):
    # n = 1: next_token is a draw from the root's filtered distribution, so the kept set and its mass are what
    # decides it; the uniforms at both ends of [0, 1) draw the first and the last kept token.
    g = torch.Generator().manual_seed(V + top_k + int(top_p * 1000))
    B = 24
    logits = _filter_stress_rows(kind, B, V, g).to(dtype)
    tokens = torch.zeros(B, 1, dtype=torch.long)
    parents = torch.full((B, 1), -1, dtype=torch.long)
    u = _filter_stress_uniforms(B, g)
    want = verify_tree(logits, tokens, parents, 1.0, top_p, top_k, uniforms=u)
    got = verify_tree(logits.cuda(), tokens.cuda(), parents.cuda(), 1.0, top_p, top_k, uniforms=u.cuda())
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("kind,V", [("quantized", 300), ("groups", 99)])
@pytest.mark.parametrize("top_p,top_k", [(0.5, 0), (2 / 3, 0), (1.0, 4), (0.75, 20)])
def test_filters_on_ties_and_boundaries_match_oracle(kind, V, top_p, top_k):
    # The same stress rows on the CPU kernel against the oracle, so the shapes the CUDA test uses are known good.
    g = torch.Generator().manual_seed(V + top_k)
    B = 8
    logits = _filter_stress_rows(kind, B, V, g)
    tokens = torch.zeros(B, 1, dtype=torch.long)
    parents = torch.full((B, 1), -1, dtype=torch.long)
    u = _filter_stress_uniforms(B, g)
    want = verify_tree_oracle(logits, tokens, parents, 1.0, top_p, top_k, uniforms=u)
    got = verify_tree(logits, tokens, parents, 1.0, top_p, top_k, uniforms=u)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_seeded_determinism_and_graph_capture():
    logits, tokens, parents, _ = _cuda_inputs(64, 20, 32000, torch.bfloat16, seed=3)
    logits, tokens, parents = logits.cuda(), tokens.cuda(), parents.cuda()
    run = lambda seed: verify_tree(logits, tokens, parents, 1.0, 0.9, 50,
                                   generator=torch.Generator("cuda").manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Under CUDA graph capture the default generator's offset is read on the device: replays differ, and no
    # host sync happens inside the op.
    torch.cuda.manual_seed(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        verify_tree(logits, tokens, parents, 1.0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify_tree(logits, tokens, parents, 1.0)
    graph.replay()
    first = [t.clone() for t in out]
    graph.replay()
    assert ((out[1] >= 0) & (out[1] < 20)).all() and ((out[2] >= 0) & (out[2] < 32000)).all()
    assert not all(torch.equal(x, y) for x, y in zip(first, out))


@needs_cuda
def test_cuda_bad_input_errors():
    logits, tokens, parents, _ = _cuda_inputs(3, 6, 100, torch.float32, seed=1)
    bad = parents.clone()
    bad[2, 4] = 4
    with pytest.raises(ValueError, match="not a tree"):
        verify_tree(logits.cuda(), tokens.cuda(), bad.cuda(), 1.0)
    bad_tok = tokens.clone()
    bad_tok[1, 2] = 100
    with pytest.raises(ValueError, match="outside"):
        verify_tree(logits.cuda(), bad_tok.cuda(), parents.cuda())
    nan = logits.clone()
    nan[0, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        verify_tree(nan.cuda(), tokens.cuda(), parents.cuda(), 1.0)
    with pytest.raises(ValueError, match="draft_tokens must be on cuda"):
        verify_tree(logits.cuda(), tokens, parents.cuda())


@needs_cuda
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (1.5, 1.0, 3), (1.0, 0.8, 0)])
def test_cuda_emitted_distribution_matches_target(temperature, top_p, top_k):
    _check_emitted_distribution(temperature, top_p, top_k, torch.Generator("cuda").manual_seed(99), device="cuda")


def test_benchmark_quick_runs(tmp_path):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_verify_tree.py")
    spec = importlib.util.spec_from_file_location("bench_verify_tree", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "verify_tree_quick.json").read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert len(data["results"]) == 16 and all(r["op_ms"] > 0 and r["oracle_ms"] > 0 for r in data["results"])
    assert (tmp_path / "verify_tree_quick.md").read_text().startswith("# verify_tree benchmark")
    assert {r["mode"] for r in data["results"]} >= {"T=1 p=.9"}  # the top-p-only case (top-k 0)
