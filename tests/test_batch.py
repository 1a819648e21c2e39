"""Batched generation (hass_ext.batch; generate/stream over a list of prompts): each row decodes as it would alone.

Greedy rows are token-identical to lone vanilla runs (bit for bit on the row-invariant kernels, vanilla and
speculative batches, B = 1 to 8, prompts of 1 to 1000 tokens), rows that end on their first token or at their own
max_new_tokens leave the batch without disturbing the others, sampled rows draw from their own generator and follow
the target's distribution, stream yields (row, piece) pairs, bad input is refused by name, batch_size splits give
the same results, and the batch layout holds at the op level (draft_trees, forward_rows, select_rows).
"""
import sys

import pytest
import torch

import hass_ext
from hass_ext import batch
from hass_ext.draft import context_pass
from hass_ext.kv_cache import SlotCache
from hass_ext.speculative import Sampling, State, decode_step, verify
from hass_ext.tree import draft_tree, draft_trees, tree_from_parents
from sampling_stats import exact_three_tokens, goodness_of_fit
from tiny_models import agreeing_draft, tiny_target

TIE = 1e-4  # sdpa targets (BLAS linear layers): a divergence is tolerated only at a top-2 logit gap this small
MAX_NEW = 24
TREES = {"8-3-3": dict(total_tokens=8, depth=3, tree_topk=3), "60-6-10": dict(total_tokens=60, depth=6, tree_topk=10),
         "chain-4-3-1": dict(total_tokens=4, depth=3, tree_topk=1)}
_g = torch.Generator().manual_seed(0)
# rows of different lengths from B = 2 on (5, 1, 23, ...): the batch is ragged from its first forward
PROMPTS = [torch.randint(0, 64, (n,), generator=_g).tolist() for n in (5, 1, 23, 40, 2, 17, 9, 31)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on these shapes an OpenMP team saves little (SmolLM2 at most 2x on 2 cores), and on a
    shared machine its spin-waits make a test 10x slower or worse."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def exact_tiny(seed=3, dtype=torch.float32, **kw):
    """A tiny llama on the row-invariant kernels (hass_tree attention, SmallLinear layers), as load_target sets up
    CPU targets: there a batch row's logits are those of the lone run bit for bit. Unscaled logits: near-ties
    are frequent, so any numerical difference between batched and lone decoding would show."""
    target = tiny_target("llama", seed=seed, dtype=dtype, **{"vocab": 64, "hidden": 64, **kw})
    hass_ext.register_hass_tree()
    target.model.config._attn_implementation = "hass_tree"
    for layer in target.model.model.layers:
        layer.self_attn.config._attn_implementation = "hass_tree"
    hass_ext.use_small_linear(target.model)
    return target


def sdpa_tiny(seed=3, **kw):
    """A tiny llama with sdpa attention and BLAS linear layers: batched rows see an additive 4D mask."""
    return tiny_target("llama", seed=seed, scale=20.0, **{"vocab": 64, "hidden": 64, **kw})


def top2_gap(target, prompt, tokens) -> float:
    """Vanilla's top-2 logit difference after ``prompt + tokens``."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.inference_mode():
        top2 = target.model(ids).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


def assert_row_equals_lone(target, prompt, lone, got, exact, what):
    """A batch row's tokens == the lone run's: exactly on the row-invariant kernels; elsewhere except after a
    numerical tie of vanilla's two best logits (where the row may take the other token)."""
    if exact or got == lone:
        assert got == lone, f"{what}: batch row differs from its lone run"
        return
    i = next((j for j, (a, b) in enumerate(zip(lone, got)) if a != b), min(len(lone), len(got)))
    gap = top2_gap(target, prompt, lone[:i])
    assert gap < TIE, f"{what}: batch row differs from its lone run at token {i} with no tie (gap {gap:.3g})"


def drain(gen):
    """All items a generator yields and its return value."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


# ---- 1. greedy: every row == its lone vanilla run ------------------------------------------------------------

@pytest.fixture(scope="module")
def kinds():
    """name -> (target, random draft, bit-exact?, cache of lone vanilla runs)."""
    targets = {"hass_tree": exact_tiny(), "hass_tree-bf16": exact_tiny(dtype=torch.bfloat16), "sdpa": sdpa_tiny()}
    return {name: (t, hass_ext.init_draft(t, seed=1), name != "sdpa", {}) for name, t in targets.items()}


def lone_run(kind, i, max_new=MAX_NEW):
    target, _, _, cache = kind
    if (i, max_new) not in cache:
        cache[(i, max_new)] = hass_ext.generate(PROMPTS[i], target=target, max_new_tokens=max_new).token_ids
    return cache[(i, max_new)]


@pytest.mark.parametrize("B", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["hass_tree", "hass_tree-bf16", "sdpa"])
def test_greedy_rows_equal_lone_vanilla_runs(kinds, kind, B):
    """Vanilla and speculative batches (three tree shapes): row i == generate(prompt_i, draft=None)."""
    target, draft, exact, _ = kinds[kind]
    prompts = PROMPTS[:B]
    for name, d, tree in [("vanilla", None, {})] + [(n, draft, t) for n, t in TREES.items()]:
        results = hass_ext.generate(prompts, target=target, draft=d, max_new_tokens=MAX_NEW, **tree)
        assert isinstance(results, list) and len(results) == B
        for i, (p, r) in enumerate(zip(prompts, results)):
            assert_row_equals_lone(target, p, lone_run(kinds[kind], i), r.token_ids, exact,
                                   f"{kind} B={B} {name} row {i}")
            assert r.prompt_tokens == len(p) and r.stop_reason == "length" and len(r.token_ids) == MAX_NEW
            assert r.text == target.tokenizer.decode(r.token_ids)
            if d is None:
                assert r.num_rounds == 0 and r.tree is None
            else:  # the first token comes from the prefill, each round commits accepted + 1 (the last one cut)
                assert r.tree.options() == tree and r.num_rounds >= 1
                assert 1 + sum(a + 1 for a in r.accept_lengths[:-1]) < MAX_NEW <= 1 + sum(
                    a + 1 for a in r.accept_lengths)


@pytest.mark.parametrize("attention", ["hass_tree", "sdpa"])
def test_mixed_prompt_lengths_1_to_1000_tokens(attention):
    """One batch of prompts of 1 to 1000 tokens (tiles of the tree-attention kernel crossed at 127/129)."""
    target = exact_tiny(seed=7, max_pos=2048) if attention == "hass_tree" else sdpa_tiny(seed=7, max_pos=2048)
    draft = hass_ext.init_draft(target, seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 1000, 2, 127, 129, 513)]
    lone = [hass_ext.generate(p, target=target, max_new_tokens=16).token_ids for p in prompts]
    for name, d, tree in (("vanilla", None, {}), ("8-3-3", draft, TREES["8-3-3"]),
                          ("60-6-10", draft, TREES["60-6-10"])):
        results = hass_ext.generate(prompts, target=target, draft=d, max_new_tokens=16, **tree)
        for i, (p, r) in enumerate(zip(prompts, results)):
            assert r.prompt_tokens == len(p)
            assert_row_equals_lone(target, p, lone[i], r.token_ids, attention == "hass_tree",
                                   f"{attention} {name} row {i} ({len(p)} tokens)")


def test_equal_rows_one_token_rows_and_rows_at_the_length_limit():
    """Rows of one common length (the non-ragged forward) including two identical rows; every row ending on its
    first token (no round at all); a prompt one token short of max_position_embeddings (max_new_tokens clamped to
    1) beside a short one. Prompts given as a tuple of 1-D tensors. Every row == its lone run."""
    target = exact_tiny(seed=3, max_pos=64)
    draft = hass_ext.init_draft(target, seed=1)
    g = torch.Generator().manual_seed(4)
    a, b, full = (torch.randint(0, 64, (n,), generator=g) for n in (7, 7, 63))
    cases = (((a, a, b), [20] * 3), ((a, b), [1, 1]), ((full, a), [20, 20]), ((a, full, b), [5, 30, 9]))
    for prompts, max_new in cases:
        lone = [hass_ext.generate(p, target=target, max_new_tokens=m) for p, m in zip(prompts, max_new)]
        assert all(len(r.token_ids) == (1 if len(p) == 63 else m) for p, m, r in zip(prompts, max_new, lone))
        for d, tree in ((None, {}), (draft, TREES["8-3-3"]), (draft, TREES["60-6-10"])):
            results = hass_ext.generate(prompts, target=target, draft=d, max_new_tokens=max_new, **tree)
            got = [(r.token_ids, r.stop_reason, r.num_rounds > 0) for r in results]
            assert got == [(r.token_ids, r.stop_reason, d is not None and len(r.token_ids) > 1) for r in lone], \
                f"{[len(p) for p in prompts]} tokens, max_new_tokens {max_new}, tree {tree}"


def full_depth_rounds(accepts, max_new, depth):
    """How many of a lone speculative run's first rounds drafted all ``depth`` levels (more than depth tokens still
    to come). A batch drafts as deep for its rows there (it limits the depth by its longest remaining row), so
    with the same draft context and root features a row accepts exactly what it accepts alone in those rounds."""
    produced, n = 1, 0
    for a in accepts:
        if max_new - produced - 1 < depth:
            break
        n, produced = n + 1, produced + a + 1
    return n


# ---- 3. rows that end at different rounds --------------------------------------------------------------------

def test_rows_end_on_first_token_and_at_their_own_max_new_tokens():
    """Row 0 ends on its first token (EOS), rows 1-3 at max_new_tokens 5, 17 and 40, i.e. in different rounds,
    with a draft that accepts several tokens per round (chunks cut at the row's end): every row == its lone run."""
    probe = exact_tiny(seed=11)
    g = torch.Generator().manual_seed(5)
    pool = [torch.randint(0, 64, (n,), generator=g) for n in (6, 3, 14, 9, 20, 4, 11, 7)]
    eos = hass_ext.generate(pool[0], target=probe, max_new_tokens=1).token_ids[0]
    target = exact_tiny(seed=11, eos_token_id=eos)  # the same weights (same seed), EOS = row 0's first token
    runs = [hass_ext.generate(p, target=target, max_new_tokens=40).token_ids for p in pool]
    assert runs[0] == [eos]
    # rows that do not meet the EOS in 40 tokens: they must end on max_new_tokens
    others = [i for i in range(1, len(pool)) if len(runs[i]) == 40][:3]
    assert len(others) == 3, "the fixed prompts should give three rows that run 40 tokens"
    prompts = [pool[0]] + [pool[i] for i in others]
    max_new = [1, 5, 17, 40]
    draft = agreeing_draft(target, [torch.cat([pool[i], torch.tensor(runs[i])]) for i in others], steps=150)
    for name, d, tree in (("vanilla", None, {}), ("8-3-3", draft, TREES["8-3-3"]),
                          ("10-5-2", draft, dict(total_tokens=10, depth=5, tree_topk=2))):
        results = hass_ext.generate(prompts, target=target, draft=d, max_new_tokens=max_new, **tree)
        assert results[0].token_ids == [eos] and results[0].stop_reason == "eos" and results[0].num_rounds == 0
        for r, m, i in zip(results[1:], max_new[1:], others):
            assert r.stop_reason == "length" and len(r.token_ids) == m, f"{name}: {r.stop_reason} {len(r.token_ids)}"
            assert r.token_ids == runs[i][:m], f"{name}: row with max_new_tokens={m} differs from its lone run"
        if d is not None:
            rounds = [r.num_rounds for r in results]
            assert rounds == sorted(rounds) and len(set(rounds)) == 4, f"{name}: rows should end in different " \
                                                                       f"rounds, got {rounds}"
            accepts = [a for r in results for a in r.accept_lengths]
            assert max(accepts) >= 2, f"{name}: the fitted draft should get multi-token rounds, got {accepts}"
            for r, p, m in zip(results, prompts, max_new):  # the draft side of the batch: the same trees
                alone = hass_ext.generate(p, target=target, draft=d, max_new_tokens=m, **tree).accept_lengths
                n = full_depth_rounds(alone, m, tree["depth"])
                assert r.accept_lengths[:n] == alone[:n], f"{name}: the batch row accepts other draft tokens " \
                                                          f"than its lone speculative run"
    # an EOS inside a round: row 1's 4th token ends the rows that meet it, wherever it falls in a chunk
    mid = runs[others[0]][3]
    target.tokenizer.eos_token_id = mid
    target.model.generation_config.eos_token_id = mid
    lone = [hass_ext.generate(p, target=target, max_new_tokens=m).token_ids for p, m in zip(prompts, max_new)]
    results = hass_ext.generate(prompts, target=target, draft=draft, max_new_tokens=max_new, **TREES["8-3-3"])
    assert [r.token_ids for r in results] == lone
    assert results[1].stop_reason == "eos" and results[1].token_ids[-1] == mid


# ---- 4. seeds -----------------------------------------------------------------------------------------------

SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=40)


def test_vanilla_sampled_rows_equal_lone_runs_with_their_seeds():
    """Vanilla batches: a row's logits are the lone run's bit for bit and it samples with its own generator, so
    row i with seed s == generate(prompt_i, seed=s); one int seed gives row i the seed s + i."""
    target = exact_tiny(seed=3)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[1]]  # rows 0 and 2: same prompt, different seeds
    seeds = [11, 12, 13, 14]
    results = hass_ext.generate(prompts, target=target, max_new_tokens=MAX_NEW, seed=seeds, **SAMPLING)
    for p, s, r in zip(prompts, seeds, results):
        assert r.token_ids == hass_ext.generate(p, target=target, max_new_tokens=MAX_NEW, seed=s, **SAMPLING).token_ids
    assert results[0].token_ids != results[2].token_ids, "rows with different seeds must not share a stream"
    same = hass_ext.generate(prompts, target=target, max_new_tokens=MAX_NEW, seed=11, **SAMPLING)
    assert [r.token_ids for r in same] == [r.token_ids for r in results]


def test_speculative_sampled_rows_are_reproducible_per_seed():
    """Speculative batches: the same seeds give the same tokens and accept lengths; a row's tokens depend on its
    own seed (the same prompt with other seeds gives other tokens); one int seed == seeds s, s + 1, ..."""
    target = exact_tiny(seed=3, scale=3.0)
    draft = hass_ext.init_draft(target, seed=1)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    opts = dict(target=target, draft=draft, max_new_tokens=MAX_NEW, **SAMPLING, **TREES["8-3-3"])
    a = hass_ext.generate(prompts, seed=[5, 6, 7], **opts)
    b = hass_ext.generate(prompts, seed=5, **opts)
    assert [(r.token_ids, r.accept_lengths) for r in a] == [(r.token_ids, r.accept_lengths) for r in b]
    assert a[0].token_ids != a[2].token_ids, "rows with different seeds must not share a stream"
    c = hass_ext.generate(prompts, seed=[8, 9, 10], **opts)
    assert all(x.token_ids != y.token_ids for x, y in zip(a, c))


# ---- 5. the sampled distribution with B > 1 -----------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.8, 0.9, 6)])
def test_batched_sampling_matches_target_distribution(temperature, top_p, top_k):
    """8 rows (two prompts of different lengths, four rows each, rows of 3 and of 5 new tokens: rows leave the
    batch at different rounds) per batched_speculative_decode call; the first 3 tokens of each prompt's rows vs
    the exact enumeration: chi-square p > 1e-4 (joint and per position) and total variation below the mean + 5 sd
    of exact samplers with the same number of draws. Tree 16 / 3 / 8. Fixed seeds: deterministic."""
    V, calls = 16, 500
    target = tiny_target("llama", seed=0, vocab=V, hidden=32, scale=10.0)
    # a random draft over 16 tokens: its top-8 candidates hold much of the mass, acceptances and rejections mix
    draft = hass_ext.init_draft(target, seed=1)
    prompts = [torch.tensor([1, 5, 9, 2]), torch.tensor([3, 3, 7, 1, 0, 12, 4, 8, 2, 6, 11])]
    rows = [0, 1] * 4
    max_new = [3, 3, 3, 3, 5, 5, 5, 5]
    sampling = Sampling(temperature, top_p, top_k, None)
    generators = [torch.Generator().manual_seed(1000 + b) for b in range(len(rows))]  # each row its own stream
    counts = [torch.zeros(V, V, V, dtype=torch.float64) for _ in prompts]
    accepted = rounds = 0
    for _ in range(calls):
        toks = [[] for _ in rows]
        for ev in batch.batched_speculative_decode(target, draft, [prompts[i][None] for i in rows], max_new,
                                                   sampling, generators, frozenset(), 16, 3, 8):
            toks[ev.row] += ev.tokens
            if ev.accepted is not None:
                accepted, rounds = accepted + ev.accepted, rounds + 1
        assert [len(t) for t in toks] == max_new
        for i, t in zip(rows, toks):
            counts[i][t[0], t[1], t[2]] += 1
    assert accepted > rounds // 4, "too few accepted draft tokens for the test to exercise acceptance"
    n = calls * rows.count(0)
    ref = torch.Generator().manual_seed(99)
    for i, prompt in enumerate(prompts):
        exact = exact_three_tokens(target, prompt, temperature, top_p, top_k)
        c = counts[i]
        pvalues, tv, ref_tv = goodness_of_fit(c, exact, ref, ref_samplers=30)
        bound = float(ref_tv.mean() + 5 * ref_tv.std())
        print(f"prompt {i}: chi2 p-values {pvalues}; TV {tv:.3f} (bound {bound:.3f}); tau "
              f"{(accepted + rounds) / rounds:.2f}")
        assert pvalues["joint"][1] >= 30, "too few cells with 5 expected draws for the joint test"
        for name, (p, _) in pvalues.items():
            assert p > 1e-4, f"prompt {i} {name}: batched sampling does not follow the target (chi2 p={p:.2g})"
        assert tv < bound, f"prompt {i}: TV {tv:.3f} above the bound {bound:.3f} of exact sampling"
        assert float(c[exact == 0].sum()) == 0, "sampled a sequence the target gives probability 0"


# ---- 6. stream ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("speculative", [False, True], ids=["vanilla", "speculative"])
def test_stream_over_a_batch(speculative):
    """(row, piece) pairs as the rows advance (interleaved, not row after row); each row's pieces join to its
    result's text; the return value is generate's list of results."""
    target = exact_tiny(seed=3)
    draft = hass_ext.init_draft(target, seed=1) if speculative else None
    tree = TREES["8-3-3"] if speculative else {}
    prompts, max_new = PROMPTS[:4], [12, 3, 20, 7]
    pieces, results = drain(hass_ext.stream(prompts, target=target, draft=draft, max_new_tokens=max_new, **tree))
    expected = hass_ext.generate(prompts, target=target, draft=draft, max_new_tokens=max_new, **tree)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert all(isinstance(row, int) and isinstance(piece, str) and piece for row, piece in pieces)
    for i, r in enumerate(results):
        assert "".join(piece for row, piece in pieces if row == i) == r.text
    order = [row for row, _ in pieces]
    assert order != sorted(order), "rows should stream side by side"


# ---- 7. bad input -------------------------------------------------------------------------------------------

def test_bad_batch_input(monkeypatch):
    """ValueErrors naming the bad row or per-row option; the per-row checks run before the target is loaded."""
    target = tiny_target("llama", seed=0, vocab=64, max_pos=32)
    gen_module = sys.modules["hass_ext.generate"]

    def no_load(*a, **k):
        raise AssertionError("the target was resolved before the arguments were checked")

    three = [[1], [2], [3]]
    cases = [  # (prompts, options, the message)
        ([], {}, r"prompts is an empty list"),
        (["a", 3], {}, r"prompts\[1\] must be a string, a list of chat messages or token ids, got int 3"),
        (three, dict(max_new_tokens=[4, 4]), r"max_new_tokens has 2 entries; give one per prompt \(3\) or one value"),
        (three, dict(seed=[1, 2]), r"seed has 2 entries; give one per prompt \(3\)"),
        (three, dict(max_new_tokens=[4, 0, 4]), r"max_new_tokens\[1\] must be an int > 0, got 0"),
        (three, dict(max_new_tokens=[4, 4, 2.5]), r"max_new_tokens\[2\] must be an int > 0, got 2.5"),
        (three, dict(max_new_tokens=[True, 4, 4]), r"max_new_tokens\[0\] must be an int > 0, got True"),
        (three, dict(seed=[1, "x", 3]), r"seed\[1\] must be an int or None"),
        (three, dict(batch_size=0), r"batch_size must be an int >= 1 or None"),
        (three, dict(batch_size=1.5), r"batch_size must be an int >= 1 or None"),
        ([1, 2, 3], dict(batch_size=2), r"batch_size applies to a list of prompts; one prompt was given"),
        (three, dict(total_tokens=8), r"tree options .* need a draft"),
    ]
    monkeypatch.setattr(gen_module, "resolve_target", no_load)
    for prompts, options, match in cases:
        with pytest.raises(ValueError, match=match):
            hass_ext.generate(prompts, target=None, **options)
        with pytest.raises(ValueError, match=match):  # stream: at the first next()
            next(hass_ext.stream(prompts, target=None, **options))
    monkeypatch.undo()
    # rows checked by the target: named by their index
    for prompts, match in (([[1, 2], list(range(40))], r"prompts\[1\] has 40 tokens; .* accepts at most 32"),
                           ([[1, 2], []], r"prompts\[1\]: prompt must be a non-empty"),
                           ([[1], [99]], r"prompts\[1\]: prompt token ids must be in \[0, 64\)")):
        with pytest.raises(ValueError, match=match):
            hass_ext.generate(prompts, target=target, max_new_tokens=4)


def test_targets_a_batch_cannot_decode_are_refused():
    """Rows of different lengths need an attention that takes the per-row mask, and a sliding window would be
    ignored by it: such targets get a ValueError naming the cause, vanilla batches included."""
    prompts = [[1, 2, 3], [4, 5]]
    flash = tiny_target("llama", seed=0, vocab=64)
    flash.model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    speculative = dict(draft=hass_ext.init_draft(flash, seed=1), total_tokens=4, depth=2, tree_topk=2)
    for options in ({}, speculative):
        with pytest.raises(ValueError, match="needs the target's attention to take the tree mask"):
            hass_ext.generate(prompts, target=flash, max_new_tokens=4, **options)
    window = tiny_target("mistral", seed=0, vocab=64, sliding_window=8)
    with pytest.raises(ValueError, match="batched decoding supports it only while"):
        hass_ext.generate(prompts, target=window, max_new_tokens=16)
    with pytest.raises(ValueError, match="speculative decoding supports it only while"):
        hass_ext.generate(prompts, target=window, draft=hass_ext.init_draft(window, seed=1), max_new_tokens=16,
                          total_tokens=4, depth=2, tree_topk=2)


# ---- 8. batch_size ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 2])
def test_batch_size_splits_give_the_same_results(batch_size):
    """5 prompts in batches of batch_size == one batch of 5: greedy speculative, sampled vanilla (seed + i is the
    seed of the prompt's index in the whole list, whatever its batch)."""
    target = exact_tiny(seed=3)
    draft = hass_ext.init_draft(target, seed=1)
    prompts, max_new = PROMPTS[:5], [9, 20, 4, 15, 11]
    for opts in (dict(draft=draft, **TREES["8-3-3"]), dict(seed=21, **SAMPLING)):
        one = hass_ext.generate(prompts, target=target, max_new_tokens=max_new, **opts)
        split = hass_ext.generate(prompts, target=target, max_new_tokens=max_new, batch_size=batch_size, **opts)
        assert [(r.token_ids, r.stop_reason) for r in split] == [(r.token_ids, r.stop_reason) for r in one]
        assert [len(r.token_ids) for r in split] == max_new


# ---- 9. the layout at the op level --------------------------------------------------------------------------

def test_draft_trees_equal_draft_tree_row_by_row():
    """The draft context pass of a batch (batch._extend: the prompts, then a round's new positions, a different
    number per row, compacted into place) leaves row b's entries at [0, len_b) as lone context passes do;
    draft_trees over these rows of different lengths gives each row draft_tree's tree (tokens, parents, depths,
    mask), with and without the early stop, and leaves every row's context untouched."""
    target = tiny_target("llama", seed=0, vocab=64, hidden=64)
    draft = hass_ext.init_draft(target, seed=4)
    H = target.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def random_pairs(counts):
        return [(torch.randn(n, H, generator=g), torch.randint(0, 64, (n,), generator=g)) for n in counts]

    prompt_lengths, new = [5, 1, 37, 12], [3, 1, 2, 4]
    first, second = random_pairs(prompt_lengths), random_pairs(new)
    B = len(new)
    dcache = draft.new_cache(batch=B, capacity=64)
    batch._extend(draft, dcache, [0] * B, first)
    hidden = batch._extend(draft, dcache, prompt_lengths, second)
    lengths = [n + m for n, m in zip(prompt_lengths, new)]
    assert dcache.length == max(lengths)
    lone_caches = []
    for b, n in enumerate(lengths):
        lone = draft.new_cache(batch=1, capacity=64)
        context_pass(draft, lone, *first[b])
        h = context_pass(draft, lone, *second[b])
        torch.testing.assert_close(hidden[b], h, rtol=1e-5, atol=1e-5)
        for kv, lkv in zip(dcache.layers, lone.layers):
            torch.testing.assert_close(kv[:, b, :, :n], lkv[:, 0, :, :n], rtol=1e-5, atol=1e-5)
            lkv[:, 0, :, :n] = kv[:, b, :, :n]  # the lone tree reads the batch's entries: only the levels differ
        lone_caches.append(lone)
    context = [kv.clone() for kv in dcache.layers]
    roots = torch.tensor([7, 0, 63, 21])
    for early_stop in (True, False):
        trees = draft_trees(draft, dcache, hidden, roots, torch.tensor(lengths), 24, 4, 5, early_stop=early_stop)
        for b in range(B):
            for kv, before in zip(dcache.layers, context):
                assert torch.equal(kv[:, b, :, :lengths[b]], before[:, b, :, :lengths[b]])
            t = draft_tree(draft, lone_caches[b], hidden[b], int(roots[b]), 24, 4, 5, early_stop=early_stop)
            for field in ("tokens", "parents", "depths", "mask"):
                assert torch.equal(getattr(trees, field)[b], getattr(t, field)), f"row {b}: {field} differs"


def test_forward_rows_logits_equal_lone_forwards_bitwise():
    """forward_rows over rows of 1 to 130 committed positions (per-row prefill into one cache): a one-token step
    per row == decode_step after the lone prefill, and a tree per row == the lone verify forward, bit for bit."""
    target = exact_tiny(seed=3)
    g = torch.Generator().manual_seed(2)
    lengths = [3, 17, 130, 1]
    prompts = [torch.randint(0, 64, (1, n), generator=g) for n in lengths]
    B, n = len(lengths), 6
    cache, logits, _ = batch._prefill_rows(target, prompts, capacity=160)
    length_t = torch.tensor(lengths)
    # one random tree of n nodes per row, as draft_trees would give: root = the row's next token
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
                           for _ in range(B)])
    tokens = torch.randint(0, 64, (B, n), generator=g)
    trees = [tree_from_parents(tokens[b], parents[b]) for b in range(B)]
    mask = torch.stack([t.mask for t in trees])
    depths = torch.stack([t.depths for t in trees])
    out, _ = batch.forward_rows(target, cache, tokens, length_t[:, None] + depths, mask, length_t)
    for b, p in enumerate(prompts):
        pre = target.prefill(p, past_key_values=target.new_cache(lengths[b] + n))
        assert torch.equal(pre.logits[0, -1], logits[b])
        state = State(cache=pre.past_key_values, draft_cache=None, length=lengths[b], root=0, root_hidden=None)
        lone, _ = verify(target, state, trees[b])
        assert torch.equal(lone[0], out[b]), f"row {b}: tree logits differ from the lone verify forward"
    # one token per row (a vanilla batch step) after the same prefills
    cache.truncate(max(lengths))
    step, _ = batch.forward_rows(target, cache, tokens[:, :1], length_t[:, None],
                                 torch.ones(B, 1, 1, dtype=torch.bool), length_t)
    for b, p in enumerate(prompts):
        pre = target.prefill(p, past_key_values=target.new_cache(lengths[b] + 1))
        assert torch.equal(decode_step(target, tokens[b, :1], pre.past_key_values)[0], step[b, -1])


def test_select_rows_keeps_the_storage_and_moves_the_kept_rows():
    """SlotCache and DraftCache.select_rows: the kept rows' contents move to the front of the same storage
    (no new allocation), the layer views follow, the length is kept; a prefix selection copies nothing."""
    cache = SlotCache(num_layers=2, capacity=16)
    buf = torch.randn(4, 5, 2, 16, 8)
    cache.adopt(buf, 10)
    before, ptr = buf.clone(), buf.data_ptr()
    cache.select_rows([1, 3, 4])
    assert cache.buffer.data_ptr() == ptr and cache.buffer.shape == (4, 3, 2, 16, 8) and cache.length == 10
    assert torch.equal(cache.buffer, before[:, [1, 3, 4]])
    assert torch.equal(cache.layers[1].keys, before[2, [1, 3, 4], :, :10])
    assert torch.equal(cache.layers[1].values, before[3, [1, 3, 4], :, :10])
    assert cache.layers[0].keys.data_ptr() == ptr
    cache.select_rows([0, 1])
    assert cache.buffer.data_ptr() == ptr and torch.equal(cache.buffer, before[:, [1, 3]])

    draft = hass_ext.init_draft(tiny_target("llama", seed=0, vocab=64, hidden=64), seed=0)
    dcache = draft.new_cache(batch=4, capacity=16)
    for kv in dcache.layers:
        kv.copy_(torch.randn(kv.shape))
    dcache.length = 9
    saved = [(kv.clone(), kv.data_ptr()) for kv in dcache.layers]
    dcache.select_rows([0, 2])
    for kv, (old, p) in zip(dcache.layers, saved):
        assert kv.data_ptr() == p and torch.equal(kv, old[:, [0, 2]])
    assert dcache.length == 9
    dcache.reserve(200)  # growing after a selection keeps the kept rows (the cache's shape follows them)
    for kv, (old, _) in zip(dcache.layers, saved):
        assert kv.shape[1] == 2 and torch.equal(kv[:, :, :, :old.shape[3]], old[:, [0, 2]])
    for bad in ([1, 0], [0, 0], [0, 2]):  # not ascending, repeated, past the 2 rows left
        with pytest.raises(ValueError, match="ascending row indices"):
            dcache.select_rows(bad)
        with pytest.raises(ValueError, match="ascending row indices"):
            cache.select_rows(bad + [5])


# ---- SmolLM2 with its shipped draft -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return hass_ext.load_target(dtype=torch.float32, device="cpu")


def test_smollm2_batch_greedy_equals_lone_runs_and_streams(smollm2):
    """The default target (row-invariant kernels) and its draft: a string, a conversation and token ids in one
    batch; vanilla and speculative (stream) rows == lone vanilla runs, one row ending on EOS; the streamed pieces
    (non-ASCII text) join to each row's text. An empty string row is refused by index."""
    target = smollm2
    prompts = ["Name three colours.", [{"role": "user", "content": "Écris un haïku sur la mer."}],
               target.encode("hi")[0].tolist()]
    lone = [hass_ext.generate(p, target=target, max_new_tokens=24) for p in prompts]
    assert any(r.stop_reason == "eos" for r in lone) and any(r.stop_reason == "length" for r in lone)
    vanilla = hass_ext.generate(prompts, target=target, max_new_tokens=24)
    pieces, spec = drain(hass_ext.stream(prompts, target=target, draft="default", max_new_tokens=24,
                                         **TREES["8-3-3"]))
    for i, (want, v, s) in enumerate(zip(lone, vanilla, spec)):
        assert v.token_ids == want.token_ids and s.token_ids == want.token_ids, f"row {i} differs from its lone run"
        assert v.stop_reason == s.stop_reason == want.stop_reason and s.text == want.text
        assert "".join(piece for row, piece in pieces if row == i) == s.text
    assert sum(a for r in spec for a in r.accept_lengths) > 0, "the shipped draft should get tokens accepted"
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is empty"):
        hass_ext.generate(["hi", "  "], target=target, max_new_tokens=4)
