"""Fixed-shape rounds and vanilla steps (hass_ext.static_rounds), the loops CUDA graphs replay: greedy output
token-identical to vanilla decoding in fp32, bf16 and fp16; no host read and no host-to-device tensor inside a
round, one read after it; the same storage every round; a whole round traced by torch.compile(fullgraph=True)
with the eager bits; sampled output following the target's distribution; generate's cuda_graphs argument; capture
and replay on CUDA (skipped without a GPU)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import hass_ext
from hass_ext.speculative import Sampling, vanilla_decode
from hass_ext.static_rounds import (StaticRounds, StaticSteps, static_speculative_decode,
                                   static_vanilla_decode)
from sampling_stats import exact_three_tokens, goodness_of_fit
from test_batch import PROMPTS, TREES, _one_thread, exact_tiny  # noqa: F401  (_one_thread: autouse fixture)
from test_decode_loop import DeviceReads
from tiny_models import agreeing_draft, tiny_target

SHAPES = {**TREES, "root-only": dict(total_tokens=1, depth=3, tree_topk=1),
          "shallow-3-6-2": dict(total_tokens=3, depth=6, tree_topk=2)}


def tokens_of(decoder, limit):
    out = [t for chunk, _ in decoder for t in chunk]
    return out[:limit]


def vanilla(target, prompt, max_new):
    return tokens_of(vanilla_decode(target, torch.tensor([prompt]), max_new, 0.0, 1.0, 0, None), max_new)


def static(target, draft, prompt, max_new, tree, graphs=False, temperature=0.0, generator=None):
    return tokens_of(static_speculative_decode(target, draft, torch.tensor([prompt]), max_new, temperature, 1.0, 0,
                                               generator, **tree, cuda_graphs=graphs), max_new)


def make_rounds(target, draft, prompt, tree, room=120, temperature=0.0, generator=None):
    ids = torch.tensor([prompt], device=target.device)
    with torch.inference_mode():
        pre = target.prefill(ids, past_key_values=target.new_cache(room + tree["total_tokens"]))
        first = int(pre.logits[0, -1].argmax())
        return StaticRounds(target, draft, [ids], [first], (pre.past_key_values, [pre.hidden_states[0]]),
                            Sampling(temperature, 1.0, 0, generator), [generator], room, **tree)


# ---- greedy losslessness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tree", list(SHAPES))
def test_greedy_static_rounds_equal_vanilla(dtype, tree):
    """Token-identical to vanilla decoding on the row-invariant kernels, with unscaled tiny logits (near-ties
    everywhere): prompts of 1 to 40 tokens, 24 new tokens, and 1 and 2 new tokens (the last round overshoots)."""
    target = exact_tiny(seed=3, dtype=dtype)
    draft = hass_ext.init_draft(target, seed=1).to(dtype)
    for prompt in PROMPTS[:4]:
        want = vanilla(target, prompt, 24)
        assert static(target, draft, prompt, 24, SHAPES[tree]) == want, f"prompt of {len(prompt)} tokens"
        for max_new in (1, 2):
            assert static(target, draft, prompt, max_new, SHAPES[tree]) == want[:max_new]


def test_greedy_static_rounds_accept_with_a_draft_that_agrees():
    """With a draft trained to agree with the target, rounds accept several tokens (paths really move in both
    caches) and the output is still vanilla's."""
    target = exact_tiny(seed=3)
    prompt = PROMPTS[2]
    want = vanilla(target, prompt, 40)
    draft = agreeing_draft(target, [torch.tensor(prompt + want)])
    accepted = [a for _, a in static_speculative_decode(target, draft, torch.tensor([prompt]), 40, 0.0, 1.0, 0, None,
                                                        **TREES["8-3-3"]) if a is not None]
    assert static(target, draft, prompt, 40, TREES["8-3-3"]) == want
    assert sum(accepted) >= len(accepted), f"the agreeing draft was hardly accepted: {accepted}"


def test_static_rounds_follow_the_eager_loop_round_by_round(monkeypatch):
    """Round by round, the static rounds commit the eager loop's tokens (speculative_round, every level drafted)
    and hold the same draft state: the draft cache entries of the committed positions and the draft's output at
    the root (to float rounding: the padded context pass reduces over more masked keys)."""
    from hass_ext.speculative import initial_state, speculative_round

    monkeypatch.setattr("hass_ext.tree.EARLY_STOP_DEVICES", ())
    target = exact_tiny(seed=3)
    prompt = PROMPTS[2]
    draft = agreeing_draft(target, [torch.tensor(prompt + vanilla(target, prompt, 48))])
    tree = TREES["8-3-3"]
    ids = torch.tensor([prompt])
    sampling = Sampling(0.0, 1.0, 0, None)
    state = initial_state(target, draft, ids, sampling, room=200)
    r = make_rounds(target, draft, prompt, tree)
    assert int(r.roots[0]) == state.root
    accepted = 0
    for _ in range(12):
        want, n_acc = speculative_round(target, draft, state, sampling, **tree)
        r.round()
        assert r.read()[0] == want
        accepted += n_acc
        n = state.length
        assert int(r.lengths[0]) == n
        for got_kv, want_kv in zip(r.dcache.layers, state.draft_cache.layers):
            torch.testing.assert_close(got_kv[..., :n, :], want_kv[..., :n, :], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.root_hidden[0], state.root_hidden, rtol=1e-5, atol=1e-5)
    assert accepted >= 12, "too few accepted draft tokens for the test to exercise the compactions"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_static_vanilla_steps_equal_vanilla(dtype):
    """Fixed-shape vanilla steps (each token at a fixed slot, moved to its row's length) give vanilla decoding's
    tokens: greedy, and sampled with the same seed (the logits are the same bits, the draw the same)."""
    target = exact_tiny(seed=3, dtype=dtype)
    for prompt in PROMPTS[:4]:
        ids = torch.tensor([prompt])
        assert tokens_of(static_vanilla_decode(target, ids, 24, 0.0, 1.0, 0, None), 24) == vanilla(target, prompt, 24)
        for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 0.9, 5)):
            runs = [tokens_of(fn(target, ids, 24, temperature, top_p, top_k, torch.Generator().manual_seed(4)), 24)
                    for fn in (static_vanilla_decode, vanilla_decode)]
            assert runs[0] == runs[1]
        assert tokens_of(static_vanilla_decode(target, ids, 1, 0.0, 1.0, 0, None), 5) == vanilla(target, prompt, 1)


# ---- the round's shape: reads, storage, tracing --------------------------------------------------------------

class HostTensors(TorchFunctionMode):
    """Counts tensors made from host data (a host-to-device copy on CUDA: not capturable)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tree", ["8-3-3", "60-6-10", "root-only"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_round_reads_nothing_and_keeps_its_storage(tree, temperature):
    """Inside round(): no value read back to the host and no tensor made from host data; read() is the round's
    one read. Every buffer the state lives in keeps its storage across rounds, and the lengths advance."""
    target = exact_tiny(seed=3)
    draft = hass_ext.init_draft(target, seed=1)
    gen = torch.Generator().manual_seed(5) if temperature else None
    r = make_rounds(target, draft, PROMPTS[3], SHAPES[tree], temperature=temperature, generator=gen)
    state = [r.cache.buffer, *r.dcache.layers, r.lengths, r.roots, r.root_hidden, r.result]
    ptrs = [t.data_ptr() for t in state]
    start = int(r.lengths[0])
    for _ in range(10):
        r.draw_uniforms()
        with DeviceReads() as reads, HostTensors() as made:
            r.round()
        assert reads.count == 0, f"host reads inside a round: {reads.calls}"
        assert made.count == 0, "a tensor made from host data inside a round"
        with DeviceReads() as reads:
            r.read()
        assert reads.count == 1
        assert [t.data_ptr() for t in [r.cache.buffer, *r.dcache.layers, r.lengths, r.roots, r.root_hidden,
                                       r.result]] == ptrs
        assert r.cache.length == r.room  # the host's view of the cache never moves
    assert int(r.lengths[0]) >= start + 10


def test_a_vanilla_step_reads_nothing_and_keeps_its_storage():
    """StaticSteps.step: no host read, no tensor from host data, the same storage every step."""
    target = exact_tiny(seed=3)
    ids = torch.tensor([PROMPTS[3]])
    with torch.inference_mode():
        pre = target.prefill(ids, past_key_values=target.new_cache(81))
        steps = StaticSteps(target, pre.past_key_values, [ids.shape[1]], [int(pre.logits[0, -1].argmax())], 80,
                            greedy=True)
    ptrs = [t.data_ptr() for t in (steps.cache.buffer, steps.lengths, steps.tokens, steps.logits)]
    for _ in range(6):
        with DeviceReads() as reads, HostTensors() as made:
            steps.step()
        assert reads.count == 0 and made.count == 0, reads.calls
        assert [t.data_ptr() for t in (steps.cache.buffer, steps.lengths, steps.tokens, steps.logits)] == ptrs
    assert int(steps.lengths[0]) == ids.shape[1] + 6


def test_a_whole_round_traces_into_one_graph():
    """torch.compile(fullgraph=True) (which raises at any graph break) over a whole round: the draft tree, the
    verification forward through the slot cache, verify_tree, both compactions and the draft's context pass;
    eight compiled rounds give the eager rounds' tokens and caches bit for bit, without a recompilation."""
    import torch._dynamo

    target = exact_tiny(seed=3)
    prompt = PROMPTS[2]
    draft = agreeing_draft(target, [torch.tensor(prompt + vanilla(target, prompt, 40))])
    eager, compiled = (make_rounds(target, draft, prompt, TREES["8-3-3"]) for _ in range(2))
    torch._dynamo.reset()
    fn = torch.compile(compiled.round, fullgraph=True, backend="eager")
    moved = 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(8):
            eager.round()
            fn()
            got, want = compiled.read(), eager.read()
            assert got == want
            moved += len(want[0]) > 1
            assert torch.equal(compiled.cache.buffer, eager.cache.buffer)
            assert all(torch.equal(a, b) for a, b in zip(compiled.dcache.layers, eager.dcache.layers))
            assert torch.equal(compiled.root_hidden, eager.root_hidden)
    assert moved >= 2, "too few rounds accepted a draft token for the test to exercise compaction"


# ---- sampling ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.8, 0.9, 6)])
def test_sampled_static_rounds_follow_the_target(temperature, top_p, top_k):
    """The first 3 sampled tokens (prompt of 4 tokens, 1500 seeded runs, tree 16 / 3 / 8, a random draft over 16
    tokens: acceptances and rejections mix) against the exact enumeration: chi-square p > 1e-4 (joint and per
    position) and total variation below the mean + 5 sd of exact samplers with as many draws."""
    V, runs = 16, 1500
    target = tiny_target("llama", seed=0, vocab=V, hidden=32, scale=10.0)
    draft = hass_ext.init_draft(target, seed=1)
    prompt = torch.tensor([1, 5, 9, 2])
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    accepted = rounds = 0
    for i in range(runs):
        g = torch.Generator().manual_seed(2000 + i)
        chunks = list(static_speculative_decode(target, draft, prompt[None], 3, temperature, top_p, top_k, g,
                                                total_tokens=16, depth=3, tree_topk=8))
        toks = [t for c, _ in chunks for t in c]
        for _, a in chunks[1:]:
            accepted, rounds = accepted + a, rounds + 1
        counts[toks[0], toks[1], toks[2]] += 1
    assert accepted > rounds // 4, "too few accepted draft tokens for the test to exercise acceptance"
    exact = exact_three_tokens(target, prompt, temperature, top_p, top_k)
    pvalues, tv, ref_tv = goodness_of_fit(counts, exact, torch.Generator().manual_seed(99), ref_samplers=30)
    bound = float(ref_tv.mean() + 5 * ref_tv.std())
    assert pvalues["joint"][1] >= 30, "too few cells with 5 expected draws for the joint test"
    for name, (p, _) in pvalues.items():
        assert p > 1e-4, f"{name}: static rounds do not follow the target (chi2 p={p:.2g})"
    assert tv < bound, f"TV {tv:.3f} above the bound {bound:.3f} of exact sampling"
    assert float(counts[exact == 0].sum()) == 0, "sampled a sequence the target gives probability 0"


# ---- generate's argument ---------------------------------------------------------------------------------------

def test_generate_cuda_graphs_argument():
    """cuda_graphs=False (and the CPU default) decode as before; True needs a CUDA target; a batch takes no
    CUDA graphs; anything but a bool or None is refused by name."""
    target = exact_tiny(seed=3)
    draft = hass_ext.init_draft(target, seed=1)
    kw = dict(target=target, draft=draft, max_new_tokens=8, **TREES["8-3-3"])
    base = hass_ext.generate(PROMPTS[0], **kw)
    assert hass_ext.generate(PROMPTS[0], cuda_graphs=False, **kw).token_ids == base.token_ids
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA target"):
        hass_ext.generate(PROMPTS[0], cuda_graphs=True, **kw)
    with pytest.raises(ValueError, match="cuda_graphs=True applies to one prompt"):
        hass_ext.generate(PROMPTS[:2], cuda_graphs=True, **kw)
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        hass_ext.generate(PROMPTS[0], cuda_graphs="yes", **kw)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA target"):
        static(target, draft, PROMPTS[0], 4, TREES["8-3-3"], graphs=True)


# ---- CUDA: capture and replay ----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tree", ["8-3-3", "60-6-10"])
def test_cuda_graph_replay_equals_eager_and_vanilla(dtype, tree):
    """On CUDA: rounds replayed from a CUDA graph give the eager rounds' tokens, and greedy output equals vanilla
    decoding's (both on the row-invariant kernels); the capture raised no warning (no fallback)."""
    import warnings

    target = exact_tiny(seed=3, dtype=dtype)
    target.model.to("cuda")
    draft = hass_ext.init_draft(target, seed=1).to(device="cuda", dtype=dtype)
    for prompt in PROMPTS[:3]:
        want = vanilla(target, prompt, 32)
        eager = static(target, draft, prompt, 32, SHAPES[tree])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            replayed = static(target, draft, prompt, 32, SHAPES[tree], graphs=True)
        assert replayed == eager == want
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            steps = tokens_of(static_vanilla_decode(target, torch.tensor([prompt]), 32, 0.0, 1.0, 0, None,
                                                    cuda_graphs=True), 32)
        assert steps == want
        # generate's default on a CUDA target with hass_tree attention: the replayed loops, the same tokens
        assert hass_ext.generate(prompt, target=target, draft=draft, max_new_tokens=32, **SHAPES[tree]).token_ids \
            == hass_ext.generate(prompt, target=target, max_new_tokens=32).token_ids == want
