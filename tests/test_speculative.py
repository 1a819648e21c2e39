"""Speculative decoding end to end: lossless greedy (SmolLM2 and tiny targets), the sampling distribution, a
draft trained to agree with its target (tau > 1.5), bad input."""

import pytest
import torch

import hass_ext
from hass_ext.ops.small_linear import SmallLinear
from hass_ext.speed_eval import first_turns
from hass_ext.speculative import State, decode_step, speculative_decode, verify
from hass_ext.tree import tree_from_parents
from hass_ext.tree_choice import auto_total_tokens
from sampling_stats import exact_three_tokens, goodness_of_fit
from tiny_models import agreeing_draft, tiny_target


TIE = 1e-4  # a greedy divergence is only tolerated where vanilla's two best logits are this close


def tie_at_divergence(target, prompt, vanilla_ids, spec_ids):
    """(index, gap) of the first differing token: gap = vanilla's top-2 logit difference at that step."""
    i = next((j for j, (a, b) in enumerate(zip(vanilla_ids, spec_ids)) if a != b), None)
    if i is None:
        if len(vanilla_ids) == len(spec_ids):
            return None
        i = min(len(vanilla_ids), len(spec_ids))  # one stopped on EOS, the other did not
    ids = target.encode(prompt)
    ids = torch.cat([ids, torch.tensor([vanilla_ids[:i]], dtype=torch.long, device=ids.device)], 1)
    with torch.inference_mode():
        top2 = target.model(ids).logits[0, -1].float().topk(2).values
    return i, float(top2[0] - top2[1])


def bit_exact(target) -> bool:
    """Whether the target decodes on the row-invariant kernels (hass_tree attention, small_linear layers), where
    greedy speculative output must equal vanilla's bit for bit, ties included."""
    return (target.model.config._attn_implementation == "hass_tree"
            and all(type(m) is SmallLinear for m in target.model.modules() if isinstance(m, torch.nn.Linear)))


def assert_lossless(target, prompts, vanilla, draft, max_new_tokens, **tree):
    """Greedy speculative output == vanilla output for every prompt: exactly on the row-invariant kernels;
    elsewhere (a 4D-mask sdpa/eager target) except at a numerical tie (reported)."""
    ties, rounds, tokens = [], 0, 0
    exact = bit_exact(target)
    for name, prompt in prompts:
        spec = hass_ext.generate(prompt, target=target, draft=draft, max_new_tokens=max_new_tokens, **tree)
        rounds, tokens = rounds + spec.num_rounds, tokens + spec.num_new_tokens
        if exact:
            assert spec.token_ids == vanilla[name], f"{name}: speculative output differs from vanilla ({tree})"
        elif spec.token_ids != vanilla[name]:
            i, gap = tie_at_divergence(target, prompt, vanilla[name], spec.token_ids)
            assert gap < TIE, (f"{name}: speculative output differs from vanilla at token {i} with no tie "
                               f"(top-2 logit gap {gap:.3g}); tree {tree}")
            ties.append((name, i, gap))
    if ties:
        print(f"tolerated divergences at numerical ties ({tree}): {ties}")
    return ties, tokens, rounds


# ---- lossless greedy on SmolLM2 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    target = hass_ext.load_target(dtype=torch.float32, device="cpu")
    draft = hass_ext.init_draft(target, seed=0)
    return target, draft, {}


def _vanilla(smollm2, prompts, max_new_tokens):
    target, _, cache = smollm2
    for name, prompt in prompts:
        if (name, max_new_tokens) not in cache:
            cache[(name, max_new_tokens)] = hass_ext.generate(prompt, target=target, max_new_tokens=max_new_tokens
                                                              ).token_ids
    return {name: cache[(name, max_new_tokens)] for name, _ in prompts}


# CPU cost (1 thread): a random draft accepts nothing, so every new token costs a whole round (~0.3 s with the
# default tree against ~0.06 s for a vanilla token). CI therefore runs 60 prompts x 16 tokens with the default
# tree and 3 prompts x 32 tokens with each other shape; bench/lossless_greedy.py records all 240 prompts x 64
# tokens x 4 tree shapes in bench/results/lossless_greedy.{json,md}.

@pytest.mark.slow
def test_lossless_greedy_smollm2_default_tree(smollm2):
    """60 evaluation prompts (20 per file), the EAGLE-2 tree (60 nodes, 6 levels, top-k 10)."""
    target, draft, _ = smollm2
    prompts = first_turns(per_file=20)
    vanilla = _vanilla(smollm2, prompts, 16)
    ties, tokens, rounds = assert_lossless(target, prompts, vanilla, draft, 16, total_tokens=60, depth=6,
                                           tree_topk=10)
    assert rounds > 0 and tokens >= rounds


@pytest.mark.slow
@pytest.mark.parametrize("tree", [dict(total_tokens=1, tree_topk=1), dict(total_tokens=8, depth=3, tree_topk=4),
                                  dict(total_tokens=7, depth=6, tree_topk=1), dict()],
                         ids=["1-node", "8-node", "chain", "auto"])
def test_lossless_greedy_smollm2_tree_shapes(smollm2, tree):
    """One prompt per file with trees of 1 and 8 nodes and a chain."""
    target, draft, _ = smollm2
    prompts = first_turns(per_file=1)
    vanilla = _vanilla(smollm2, prompts, 32)
    assert_lossless(target, prompts, vanilla, draft, 32, **tree)


# ---- lossless greedy on tiny targets of each family ---------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lossless_greedy_tiny_families(family):
    target = tiny_target(family, seed=3, vocab=64, hidden=32, scale=20.0)
    draft = hass_ext.init_draft(target, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(0, 64, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g))
               for i in range(4)]
    vanilla = {n: hass_ext.generate(p, target=target, max_new_tokens=40).token_ids for n, p in prompts}
    for tree in (dict(), dict(total_tokens=8, depth=3, tree_topk=4), dict(total_tokens=5, tree_topk=1)):
        assert_lossless(target, prompts, vanilla, draft, 40, **tree)


def kernel_calls(fn, op: str = "hass::tree_attention"):
    """fn()'s result and how many times it ran the custom op ``op`` (counted by the profiler at the dispatcher,
    whichever Python path called it)."""
    from torch.profiler import profile

    with profile() as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key == op)


def test_hass_tree_target_verifies_with_the_tree_attention_kernel():
    """A target loaded with attn_implementation="hass_tree" verifies trees with the tree-attention kernel (no 4D
    mask) and decodes exactly what the same weights with sdpa decode."""
    hass_ext.register_hass_tree()
    sdpa = tiny_target("llama", seed=3, vocab=64, hidden=32, scale=20.0)
    tree = tiny_target("llama", seed=3, vocab=64, hidden=32, scale=20.0)
    tree.model.config._attn_implementation = "hass_tree"
    for layer in tree.model.model.layers:
        layer.self_attn.config._attn_implementation = "hass_tree"
    draft = hass_ext.init_draft(sdpa, seed=1)
    prompt = torch.tensor([5, 9, 2, 7])
    vanilla = hass_ext.generate(prompt, target=sdpa, max_new_tokens=24).token_ids
    for opts in (dict(total_tokens=8, depth=3, tree_topk=4), dict(total_tokens=24, depth=5, tree_topk=3)):
        a, calls = kernel_calls(lambda: hass_ext.generate(prompt, target=tree, draft=draft, max_new_tokens=24, **opts))
        b, none = kernel_calls(lambda: hass_ext.generate(prompt, target=sdpa, draft=draft, max_new_tokens=24, **opts))
        assert a.token_ids == b.token_ids == vanilla and a.accept_lengths == b.accept_lengths
        assert calls == a.num_rounds * tree.config.num_hidden_layers and none == 0  # every layer of every round


def test_default_cpu_target_verifies_with_the_tree_attention_kernel(smollm2):
    """load_target gives CPU targets "hass_tree": sdpa itself outside trees, the tree kernel in verification, and
    the same tokens as a target loaded with sdpa; attn_implementation= still chooses."""
    target, draft, _ = smollm2
    assert target.model.config._attn_implementation == "hass_tree"
    plain = hass_ext.load_target(dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    assert plain.model.config._attn_implementation == "sdpa"
    prompt = "Name three colours."
    with torch.inference_mode():
        ids = target.encode(prompt)
        assert torch.equal(target.prefill(ids).logits, plain.prefill(ids).logits)
    vanilla, calls = kernel_calls(lambda: hass_ext.generate(prompt, target=target, max_new_tokens=16))
    # every decode step runs as a one-node tree on the same kernel (the first token comes from the prefill)
    assert calls >= (vanilla.num_new_tokens - 1) * target.config.num_hidden_layers
    assert vanilla.token_ids == hass_ext.generate(prompt, target=plain, max_new_tokens=16).token_ids
    opts = dict(max_new_tokens=16, total_tokens=6, depth=3, tree_topk=2)
    b, calls = kernel_calls(lambda: hass_ext.generate(prompt, target=plain, draft=draft, **opts))
    assert calls == 0  # sdpa verifies with the 4D mask
    a, calls = kernel_calls(lambda: hass_ext.generate(prompt, target=target, draft=draft, **opts))
    assert a.token_ids == b.token_ids == vanilla.token_ids
    assert calls == a.num_rounds * target.config.num_hidden_layers


# ---- bit for bit in every dtype ------------------------------------------------------------------------------

def exact_tiny(dtype, seed=3, **kw):
    """A tiny llama on the row-invariant kernels, as load_target sets up CPU targets."""
    target = tiny_target("llama", seed=seed, dtype=dtype, vocab=64, hidden=64, heads=4, kv_heads=2, **kw)
    hass_ext.register_hass_tree()
    target.model.config._attn_implementation = "hass_tree"
    for layer in target.model.model.layers:
        layer.self_attn.config._attn_implementation = "hass_tree"
    hass_ext.use_small_linear(target.model)
    assert bit_exact(target)
    return target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tree_node_logits_equal_decode_step_logits_bitwise(dtype):
    """Model level: the verify forward's logits of every node of a 60-node tree are the bits of the vanilla decode
    steps along the node's path (M = 60 rows vs one; any position in the tree)."""
    import copy

    target = exact_tiny(dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 64, (1, 150), generator=g)  # crosses a 128-key tile with the tree
    pre = target.prefill(prompt)
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 60)])
    tree = tree_from_parents(torch.randint(0, 64, (60,), generator=g), parents)
    state = State(cache=copy.deepcopy(pre.past_key_values), draft_cache=None, length=150, root=0, root_hidden=None)
    logits, _ = verify(target, state, tree)
    for i in range(60):
        path = tree.mask[i].nonzero().flatten().tolist()
        cache = copy.deepcopy(pre.past_key_values)
        for j in path:
            step = decode_step(target, tree.tokens[j].view(1), cache)
        assert torch.equal(step[0], logits[0, i]), f"{dtype}: node {i} (depth {len(path) - 1})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lossless_greedy_tiny_bitwise_in_every_dtype(dtype):
    """Unscaled logits (near-ties are frequent in 16-bit dtypes): identical tokens, no tie tolerated."""
    target = exact_tiny(dtype, seed=5)
    draft = hass_ext.init_draft(target, seed=1)
    g = torch.Generator().manual_seed(1)
    prompts = [(f"p{i}", torch.randint(0, 64, (int(torch.randint(1, 140, (1,), generator=g)),), generator=g))
               for i in range(3)]
    vanilla = {n: hass_ext.generate(p, target=target, max_new_tokens=40).token_ids for n, p in prompts}
    for tree in (dict(total_tokens=8, depth=3, tree_topk=3), dict(total_tokens=60, depth=6, tree_topk=10),
                 dict(total_tokens=80, depth=7, tree_topk=10)):  # past small_linear's MAX_ROWS: row_invariant()
        assert_lossless(target, prompts, vanilla, draft, 40, **tree)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def smollm2_16bit(request):
    return hass_ext.load_target(dtype=request.param, device="cpu"), None, {}


@pytest.mark.slow
@pytest.mark.parametrize("tree", [dict(total_tokens=8, depth=3, tree_topk=3), dict(total_tokens=60, depth=6,
                                                                                   tree_topk=10)],
                         ids=["8-3-3", "60-6-10"])
def test_lossless_greedy_smollm2_16bit(smollm2_16bit, tree):
    """The default target in bf16 and fp16 with its shipped draft: one prompt per evaluation file, bit for bit
    (bench/lossless_greedy.py --dtype records the 80-prompt runs)."""
    target, _, cache = smollm2_16bit
    assert bit_exact(target)
    prompts = first_turns(per_file=1)
    vanilla = _vanilla(smollm2_16bit, prompts, 32)
    assert_lossless(target, prompts, vanilla, "default", 32, **tree)


# ---- a draft trained to agree with its target ---------------------------------------------------------------

def test_trained_draft_accepts_and_stays_lossless():
    target = tiny_target("llama", seed=11, vocab=128, hidden=64, heads=4, kv_heads=2, scale=15.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (6,), generator=g) for _ in range(4)]
    vanilla = [hass_ext.generate(p, target=target, max_new_tokens=48).token_ids for p in prompts]
    sequences = [torch.cat([p, torch.tensor(v)]) for p, v in zip(prompts, vanilla)]
    draft = agreeing_draft(target, sequences)
    for tree in (dict(), dict(total_tokens=10, depth=5, tree_topk=2), dict(total_tokens=6, tree_topk=1)):
        accepted, rounds = 0, 0
        for p, v in zip(prompts, vanilla):
            spec = hass_ext.generate(p, target=target, draft=draft, max_new_tokens=48, **tree)
            assert spec.token_ids == v, f"trained draft, tree {tree}: output differs from vanilla"
            accepted += sum(spec.accept_lengths)
            rounds += spec.num_rounds
        tau = (accepted + rounds) / rounds
        print(f"trained draft, tree {tree}: tau {tau:.2f} over {rounds} rounds, {accepted} accepted draft tokens")
        assert tau > 1.5, f"tree {tree}: tau {tau:.2f} <= 1.5, the trained draft should agree with the target"
        assert accepted >= 60


# ---- sampling follows the target's distribution -------------------------------------------------------------

def sampling_setup():
    """A tiny target, a prompt and a draft fitted to sampled continuations: its candidates then carry most of the
    target's mass, so that acceptances, sibling rejections and residual draws all happen often. Also returns the
    sampled continuations (the draft's training data)."""
    target = tiny_target("llama", seed=0, vocab=32, hidden=32, layers=2, scale=10.0)
    prompt = torch.tensor([1, 5, 9, 2])
    samples = [torch.cat([prompt, torch.tensor(hass_ext.generate(prompt, target=target, max_new_tokens=6,
                                                                 temperature=1.0, seed=s).token_ids)])
               for s in range(24)]
    draft = agreeing_draft(target, [x for x in samples if x.numel() == 10], steps=200)
    return target, prompt, draft, samples


def check_sampling_distribution(target, draft, prompt, temperature, top_p, top_k, n=4000, min_accepted=None):
    """The first 3 tokens of speculative sampling vs the exact enumeration of the target's distribution.

    Bounds (fixed seeds): chi-square p-value > 1e-4 for the joint distribution of the 3 tokens and for each
    position's marginal (cells with expected count < 5 pooled); total variation of the joint below the mean + 5
    standard deviations of the TV of exact samplers with the same number of draws; no sequence of probability 0.
    Returns the sampled counts ``[V, V, V]``.
    """
    V = target.config.vocab_size
    exact = exact_three_tokens(target, prompt, temperature, top_p, top_k)
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros_like(exact)
    accepted = 0
    for _ in range(n):
        toks = []
        for chunk, a in speculative_decode(target, draft, prompt[None], 3, temperature, top_p, top_k, g,
                                           total_tokens=24, depth=3, tree_topk=8):
            toks += chunk
            accepted += a or 0
            if len(toks) >= 3:
                break
        counts[toks[0], toks[1], toks[2]] += 1
    min_accepted = n // 4 if min_accepted is None else min_accepted
    assert accepted > min_accepted, "too few accepted draft tokens for the test to exercise acceptance"
    pvalues, tv, ref_tv = goodness_of_fit(counts, exact, torch.Generator().manual_seed(99))
    tv_bound = float(ref_tv.mean() + 5 * ref_tv.std())
    print(f"T={temperature} top_p={top_p} top_k={top_k}: chi2 p-values (p, cells) {pvalues}; TV {tv:.3f} "
          f"(exact samplers {float(ref_tv.mean()):.3f} +- {float(ref_tv.std()):.3f}); {accepted} accepted drafts")
    for name, (pvalue, cells) in pvalues.items():
        assert pvalue > 1e-4, f"{name}: speculative sampling does not follow the target (chi2 p={pvalue:.2g})"
    assert tv < tv_bound, f"TV {tv:.3f} above the bound {tv_bound:.3f} of exact sampling"
    assert float(counts[exact == 0].sum()) == 0, "sampled a sequence the target gives probability 0 (top_p)"
    return counts


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (1.0, 0.8, 0)])
def test_sampling_matches_target_distribution(temperature, top_p, top_k):
    """Speculative sampling follows the target's distribution (check_sampling_distribution)."""
    target, prompt, draft, _ = sampling_setup()
    check_sampling_distribution(target, draft, prompt, temperature, top_p, top_k)


def test_sampling_is_reproducible_with_a_seed():
    target = tiny_target("llama", seed=0, vocab=32, scale=10.0)
    draft = hass_ext.init_draft(target)
    a = hass_ext.generate([3, 4, 5], target=target, draft=draft, max_new_tokens=20, temperature=1.0, seed=7)
    b = hass_ext.generate([3, 4, 5], target=target, draft=draft, max_new_tokens=20, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths


# ---- the driver: stream, stats, EOS, auto tree size --------------------------------------------------------

def test_stream_eos_and_stats():
    target = tiny_target("llama", seed=3, vocab=64, scale=20.0)
    draft = hass_ext.init_draft(target)
    vanilla = hass_ext.generate([9, 1, 7, 3], target=target, max_new_tokens=30)
    # an EOS that first appears a few tokens in, so that rounds happen before it
    eos = next(t for i, t in enumerate(vanilla.token_ids) if i >= 4 and t not in vanilla.token_ids[:i])
    target.tokenizer.eos_token_id = eos
    try:
        gen = hass_ext.stream([9, 1, 7, 3], target=target, draft=draft, max_new_tokens=30)
        pieces = []
        while True:
            try:
                pieces.append(next(gen))
            except StopIteration as stop:
                result = stop.value
                break
        first = vanilla.token_ids.index(eos)
        assert result.token_ids == vanilla.token_ids[: first + 1] and result.stop_reason == "eos"
        assert "".join(pieces) == result.text
        assert result.num_rounds == len(result.accept_lengths) >= 1
        # the prefill token plus accepted + bonus per round; the last round may be cut at EOS
        assert result.num_new_tokens <= 1 + sum(a + 1 for a in result.accept_lengths)
    finally:
        target.tokenizer.eos_token_id = None


def test_max_new_tokens_is_exact():
    target = tiny_target("llama", seed=3, vocab=64, scale=20.0)
    draft = hass_ext.init_draft(target)
    for m in (1, 2, 7):
        r = hass_ext.generate([1, 2], target=target, draft=draft, max_new_tokens=m)
        assert r.num_new_tokens == m and r.token_ids == hass_ext.generate([1, 2], target=target,
                                                                           max_new_tokens=m).token_ids


def test_auto_total_tokens():
    target = tiny_target("llama", seed=0, vocab=64)
    size = auto_total_tokens(target, 10)
    assert isinstance(size, int) and 10 <= size <= 60
    assert auto_total_tokens(target, 10) == size  # cached per (target, device)
    draft = hass_ext.init_draft(target)
    r = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=8, total_tokens="auto")
    assert r.token_ids == hass_ext.generate([1, 2, 3], target=target, max_new_tokens=8).token_ids


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_input():
    target = tiny_target("llama", seed=0, vocab=64, max_pos=32)
    draft = hass_ext.init_draft(target)
    with pytest.raises(ValueError, match="prompt has 40 tokens; .* accepts at most 32"):
        hass_ext.generate(list(range(40)), target=target, draft=draft)
    with pytest.raises(ValueError, match=r"tree_topk \(10\) must be <= total_tokens \(8\)"):
        hass_ext.generate([1, 2], target=target, draft=draft, total_tokens=8, tree_topk=10)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        hass_ext.generate([1, 2], target=target, draft=draft, depth=0)
    with pytest.raises(ValueError, match="total_tokens must be an int >= 1 or 'auto'"):
        hass_ext.generate([1, 2], target=target, draft=draft, total_tokens="big")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['top_k_tree'\]"):
        hass_ext.generate([1, 2], target=target, draft=draft, top_k_tree=3)
    with pytest.raises(ValueError, match="tree options .* need a draft"):
        hass_ext.generate([1, 2], target=target, total_tokens=8)
    with pytest.raises(ValueError, match="the draft is on cpu / torch.float64 but the target is on cpu / torch.float32"):
        hass_ext.generate([1, 2], target=target, draft=hass_ext.init_draft(target).to(torch.float64))
    with pytest.raises(ValueError, match="the draft is on meta"):
        hass_ext.generate([1, 2], target=target, draft=hass_ext.init_draft(target).to("meta"))
    with pytest.raises(ValueError, match="no default draft ships for tiny-llama yet"):
        hass_ext.generate([1, 2], target=target, draft="default")
    with pytest.raises(ValueError, match="draft must be None, 'default', a checkpoint folder or a hass_ext.DraftModel"):
        hass_ext.generate([1, 2], target=target, draft=3)
    other = tiny_target("llama", seed=0, vocab=48)
    with pytest.raises(ValueError, match="draft does not match the target: draft vocab_size=48"):
        hass_ext.generate([1, 2], target=target, draft=hass_ext.init_draft(other))
    with pytest.raises(Exception, match="draft checkpoint folder not found"):
        hass_ext.generate([1, 2], target=target, draft="/nonexistent/draft")


def test_draft_from_checkpoint_path(tmp_path):
    target = tiny_target("llama", seed=4, vocab=64, scale=20.0)
    draft = hass_ext.init_draft(target, seed=3)
    path = hass_ext.save_draft(draft, tmp_path / "d")
    a = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=12)
    b = hass_ext.generate([1, 2, 3], target=target, draft=str(path), max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths


def test_cli_generate_with_draft_and_stats(tmp_path, capsys, smollm2):
    from hass_ext.cli import main

    target, draft, _ = smollm2
    path = hass_ext.save_draft(draft, tmp_path / "draft")
    rc = main(["generate", "What is 2+2?", "--max-new-tokens", "6", "--draft", str(path), "--total-tokens", "8",
               "--depth", "3", "--tree-topk", "2", "--stats"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip() == hass_ext.generate("What is 2+2?", target=target, max_new_tokens=6).text.strip()
    assert "tau 1.00 over 5 rounds" in out.err and "speedup" in out.err
    assert main(["generate", "hi", "--total-tokens", "8"]) == 2
    assert "need --draft" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_lossless_and_sampling_runs(dtype):
    """On the GPU: greedy speculative == vanilla on CUDA (tiny target), sampling reproducible with a seed."""
    target = tiny_target("llama", seed=3, vocab=64, hidden=64, scale=20.0, dtype=dtype)
    target.model.to("cuda")
    draft = hass_ext.init_draft(target, seed=1)
    assert draft.device.type == "cuda" and draft.dtype == dtype
    g = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(0, 64, (9,), generator=g)) for i in range(3)]
    vanilla = {n: hass_ext.generate(p, target=target, max_new_tokens=32).token_ids for n, p in prompts}
    for tree in (dict(), dict(total_tokens=8, depth=3, tree_topk=4), dict(tree_topk=1)):
        assert_lossless(target, prompts, vanilla, draft, 32, **tree)
    a = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=16, temperature=1.0, seed=5)
    b = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=16, temperature=1.0, seed=5)
    assert a.token_ids == b.token_ids


def test_check_lossless_reports_routing_and_outputs():
    target = exact_tiny(torch.bfloat16, seed=5)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([9] * 30)]
    report = hass_ext.check_lossless(prompts, target=target, draft=hass_ext.init_draft(target, seed=1),
                                     max_new_tokens=12, total_tokens=8, depth=3, tree_topk=3)
    assert report.ok and report.row_invariant and report.identical == 2 and "2/2" in str(report)
    hass_ext.use_blas_linear(target.model)
    report = hass_ext.check_lossless(prompts[:1], target=target, draft=hass_ext.init_draft(target, seed=1),
                                     max_new_tokens=4)
    assert not report.ok and "not SmallLinear" in str(report)
    with pytest.raises(ValueError, match="non-empty list"):
        hass_ext.check_lossless("one prompt", target=target)
