"""The decode loop's shape on the CPU: one read from the device per round, caches allocated once per call (their
storage never changes), the target cache compacted by one op call per round, and the slot cache computing what
transformers' DynamicCache computes."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import hass_ext
from hass_ext.kv_cache import SlotCache
from hass_ext.speculative import Sampling, decode_step, initial_state, speculative_round
from test_speculative import exact_tiny, kernel_calls
from tiny_models import tiny_target

# Every way a tensor's value reaches the host (each waits for the device on CUDA).
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy}


class DeviceReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (``nonzero`` too: its output shape is a read)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.count += 1
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _setup(tree, temperature=0.0, prompt_len=20, seed=0):
    target = exact_tiny(torch.float32, seed=seed)
    draft = hass_ext.init_draft(target, seed=1)
    ids = torch.randint(0, 64, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(7) if temperature else None
    sampling = Sampling(temperature, 1.0, 0, gen)
    state = initial_state(target, draft, ids, sampling, room=200)
    return target, draft, state, sampling


@pytest.mark.parametrize("tree", [dict(total_tokens=60, depth=6, tree_topk=10),
                                  dict(total_tokens=6, depth=3, tree_topk=2),
                                  dict(total_tokens=1, depth=1, tree_topk=1)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_device_read_per_round(tree, temperature, monkeypatch):
    """Draft tree, verification forward, acceptance, compaction and the draft's context pass read exactly one
    value set from the device per round (verify_tree's result, in one transfer), as on a GPU; on the CPU the
    tree's early stop adds one read per expanded level, where a read costs nothing."""
    target, draft, state, sampling = _setup(tree, temperature)
    for early_stop in (False, True):
        monkeypatch.setattr("hass_ext.tree.EARLY_STOP_DEVICES", ("cpu",) if early_stop else ())
        for _ in range(4):
            with DeviceReads() as reads:
                speculative_round(target, draft, state, sampling, **tree)
            allowed = 1 + (max(tree["depth"] - 1, 0) if early_stop and tree["total_tokens"] > 1 else 0)
            assert (reads.count == 1) if not early_stop else (1 <= reads.count <= allowed), \
                f"{reads.count} reads in one round (early stop {early_stop}): {reads.calls}"


def test_tree_and_verification_trace_without_graph_breaks():
    """The device part of a round up to the accept read, as a GPU runs it (every draft level expanded): the draft
    tree, and the verification forward through the slot cache followed by verify_tree and a fixed-shape compaction
    (the path padded with -1 to depth + 1 entries, the destination a device tensor), each trace into one graph
    under torch.compile(fullgraph=True), which raises at any graph break, and give the eager results bit for bit;
    the padded compaction leaves the cache as the loop's own does. (The loop itself still compacts with the host's
    path, and the draft's context pass takes the accepted count on the host.)"""
    from hass_ext import ops
    from hass_ext.speculative import _verify_forward
    from hass_ext.tree import Tree, draft_tree

    target, draft, state, _ = _setup(dict(total_tokens=12, depth=4, tree_topk=3))

    def tree_fn(root_hidden):
        t = draft_tree(draft, state.draft_cache, root_hidden, state.root, 12, 4, 3, early_stop=False)
        return t.tokens, t.parents, t.depths, t.mask

    P, width = state.length, 4 + 1  # committed length; the longest path of a depth-4 tree

    def verify_fn(tokens, parents, depths, mask, length):
        logits, features = _verify_forward(target, state, Tree(tokens, parents, depths, mask))
        accepted, accept_len, next_token = ops.verify_tree(logits, tokens[None], parents[None], 0.0, 1.0, 0, None)
        path = accepted[:, :width]
        ops.compact_kv(state.cache.buffer, torch.where(path >= 0, path + length, -1), length)
        return accepted, accept_len, next_token, features

    def loop_compaction(tokens, parents, depths, mask):  # what speculative_round does, with the host's path
        logits, _ = _verify_forward(target, state, Tree(tokens, parents, depths, mask))
        accepted, accept_len, _ = ops.verify_tree(logits, tokens[None], parents[None], 0.0, 1.0, 0, None)
        state.cache.keep(accepted[0, :int(accept_len) + 1] + P, P)

    def greedy_path(tree):  # the deepest node's ancestors become the target's greedy tokens: a path is accepted
        tokens, parents, depths, mask = (t.clone() for t in tree)
        path = [int(depths.argmax())]
        while parents[path[-1]] >= 0:
            path.append(int(parents[path[-1]]))
        for a, b in zip(path[::-1], path[-2::-1]):
            logits, _ = _verify_forward(target, state, Tree(tokens, parents, depths, mask))
            state.cache.truncate(P)
            tokens[b] = logits[0, a].argmax()
        return tokens, parents, depths, mask

    torch._dynamo.reset()
    with torch.inference_mode():
        want_tree = tree_fn(state.root_hidden)
        got_tree = torch.compile(tree_fn, fullgraph=True, backend="eager")(state.root_hidden)
        assert all(torch.equal(a, b) for a, b in zip(got_tree, want_tree))
        want_tree = greedy_path(want_tree)
        before = state.cache.buffer.clone()

        def run(fn, *args):  # fn's outputs and the committed cache entries after it; then back to the start
            out = fn(*want_tree, *args)
            kept = state.cache.length if out is None else P + int(out[1]) + 1
            cache = state.cache.buffer[..., :kept, :].clone()
            state.cache.buffer.copy_(before)
            state.cache.truncate(P)
            return out, cache

        _, loop_cache = run(loop_compaction)
        want, eager_cache = run(verify_fn, torch.tensor([P]))
        got, compiled_cache = run(torch.compile(verify_fn, fullgraph=True, backend="eager"), torch.tensor([P]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(eager_cache, loop_cache) and torch.equal(compiled_cache, loop_cache)
    assert int(want[1]) >= 2 and state.cache.length == state.length  # entries really moved


def test_caches_keep_their_storage_across_rounds():
    """Both caches are allocated once, for the prompt and what follows: rounds write into them, never reallocate."""
    tree = dict(total_tokens=24, depth=5, tree_topk=4)
    target, draft, state, sampling = _setup(tree)
    target_ptr = state.cache.buffer.data_ptr()
    draft_ptrs = [kv.data_ptr() for kv in state.draft_cache.layers]
    lengths = []
    for _ in range(20):
        speculative_round(target, draft, state, sampling, **tree)
        assert state.cache.buffer.data_ptr() == target_ptr
        assert [kv.data_ptr() for kv in state.draft_cache.layers] == draft_ptrs
        assert state.cache.length == state.length == state.draft_cache.length
        lengths.append(state.length)
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]


def test_compaction_is_one_op_call_per_round():
    """The accepted entries of all layers move in one compact_kv call (none when they are already in place)."""
    tree = dict(total_tokens=24, depth=5, tree_topk=4)
    target, draft, state, sampling = _setup(tree)
    for _ in range(8):
        _, calls = kernel_calls(lambda: speculative_round(target, draft, state, sampling, **tree), "hass::compact_kv")
        assert calls <= 1


@pytest.mark.parametrize("attn", ["hass_tree", "sdpa"])
def test_slot_cache_gives_the_dynamic_cache_results(attn):
    """Prefill and decode steps through a SlotCache give the bits a DynamicCache gives."""
    from transformers import DynamicCache

    target = exact_tiny(torch.float32, seed=2) if attn == "hass_tree" else tiny_target("llama", seed=2, vocab=64)
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(0))
    slot = SlotCache.for_model(target.config, 40)
    dyn = DynamicCache(config=target.config)
    a, b = target.prefill(ids, past_key_values=slot), target.prefill(ids, past_key_values=dyn)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden_states, b.hidden_states)
    token = a.logits[:, -1].argmax(-1)
    for _ in range(7):
        la, lb = decode_step(target, token, slot), decode_step(target, token, dyn)
        assert torch.equal(la, lb)
        token = la.argmax(-1)
    assert slot.get_seq_length() == dyn.get_seq_length() == 40
    slot.crop(-5)
    dyn.crop(-5)
    assert torch.equal(decode_step(target, token, slot), decode_step(target, token, dyn))


def test_slot_cache_errors():
    target = tiny_target("llama", seed=2, vocab=64)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        SlotCache.for_model(target.config, 0)
    cache = SlotCache.for_model(target.config, 8)
    with pytest.raises(RuntimeError, match="the KV cache holds 8 positions; this forward needs 9"):
        target.prefill(torch.zeros(1, 9, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="crop takes a negative count"):
        cache.crop(2)


def test_slot_cache_filled_under_inference_mode_takes_later_no_grad_steps():
    """The buffer is a normal tensor even when the prefill runs under inference_mode (as generate's does)."""
    target = exact_tiny(torch.float32, seed=2)
    cache = SlotCache.for_model(target.config, 12)
    with torch.inference_mode():
        logits = target.prefill(torch.arange(8)[None], past_key_values=cache).logits
    with torch.no_grad():
        decode_step(target, logits[:, -1].argmax(-1), cache)
    assert cache.length == 9
