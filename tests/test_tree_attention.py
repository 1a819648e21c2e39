"""hass_ext.ops.tree_attention against the explicit-mask oracle, and the "hass_tree" transformers integration."""
import copy
import zlib

import pytest
import torch

import hass_ext  # noqa: F401
from hass_ext import ops
from hass_ext.oracles import tree_attention_oracle

CUDA = torch.cuda.is_available() and "cuda" in hass_ext.available_devices()


def ancestor_mask(parents):
    """bool [n, n]: row i = ancestors of node i and i itself (parents[0] = -1, parents[i] < i)."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def make_tree(kind, n, gen):
    if kind == "chain":
        parents = [-1] + list(range(n - 1))
    elif kind == "star":
        parents = [-1] + [0] * (n - 1)
    else:
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return parents, ancestor_mask(parents)


def rand_inputs(B, Hq, Hkv, n, prefix, d, dtype, gen, device="cpu"):
    L = prefix + n
    q = torch.randn(B, Hq, n, d, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(device, dtype)
    return q, k, v


def oracle(q, k, v, mask, scale=None, prefix_lens=None):
    return tree_attention_oracle(q.double(), k.double(), v.double(), mask, scale=scale,
                                 prefix_lens=prefix_lens).to(q.dtype)


def assert_close(out, ref, dtype):
    out, ref = out.double(), ref.double()
    err = (out - ref).abs().max().item()
    mag = ref.abs().max().item() + 1e-30
    if dtype == torch.float32:
        assert err / mag < 1e-5, f"fp32 relative error {err / mag:.3g}"
    else:
        assert err < 2e-2 * max(1.0, mag), f"{dtype} abs error {err:.3g} (max |ref| {mag:.3g})"


@pytest.mark.parametrize("kind", ["chain", "star", "random", "single"])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_tree_shapes_fp32(kind, gqa):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{gqa}".encode()))
    n = 1 if kind == "single" else int(torch.randint(2, 65, (1,), generator=gen))
    B, Hkv, prefix, d = 2, 2, int(torch.randint(0, 80, (1,), generator=gen)), 16
    _, mask = make_tree("random" if kind == "single" else kind, n, gen)
    mask = mask.expand(B, n, n).clone()
    q, k, v = rand_inputs(B, Hkv * gqa, Hkv, n, prefix, d, torch.float32, gen)
    out = ops.tree_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, oracle(q, k, v, mask), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_dtypes_head_dims(dtype, d):
    gen = torch.Generator().manual_seed(7 + d)
    B, n, prefix = 3, 60, 37
    masks = torch.stack([make_tree("random", n, gen)[1] for _ in range(B)])  # a different tree per row
    q, k, v = rand_inputs(B, 8, 2, n, prefix, d, dtype, gen)
    out = ops.tree_attention(q, k, v, masks, scale=0.3)
    assert out.dtype == dtype
    assert_close(out, oracle(q, k, v, masks, scale=0.3), dtype)


@pytest.mark.parametrize("n", [64, 65, 100, 200])
def test_more_than_64_nodes(n):
    # Trees beyond one 64-bit mask word use several words per row.
    gen = torch.Generator().manual_seed(n)
    _, mask = make_tree("random", n, gen)
    q, k, v = rand_inputs(1, 3, 1, n, 20, 8, torch.float32, gen)
    assert_close(ops.tree_attention(q, k, v, mask), oracle(q, k, v, mask[None]), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, prefix, d", [(1, 300, 64), (6, 129, 64), (11, 500, 64), (6, 40, 24), (3, 0, 64)])
def test_decode_size_trees(dtype, n, prefix, d):
    # A decode-time verification: a few query rows per kv head (SmolLM2's 9 / 3 heads), read in place from a
    # preallocated cache; head sizes that are not a multiple of 16 too.
    gen = torch.Generator().manual_seed(n * 1000 + prefix + d)
    L = prefix + n
    mask = make_tree("random", n, gen)[1]
    q = torch.randn(1, 9, n, d, generator=gen).to(dtype)
    big_k = torch.randn(1, 3, L + 37, d, generator=gen).to(dtype)
    big_v = torch.randn(1, 3, L + 37, d, generator=gen).to(dtype)
    k, v = big_k[:, :, :L], big_v[:, :, :L]
    out = ops.tree_attention(q, k, v, mask, scale=0.125)
    assert_close(out, oracle(q, k.contiguous(), v.contiguous(), mask[None], scale=0.125), dtype)


def test_small_trees_do_not_depend_on_threads():
    # The work is split into more, smaller row blocks when threads would idle; a row's result must not change.
    gen = torch.Generator().manual_seed(21)
    n, P = 6, 200
    mask = make_tree("random", n, gen)[1]
    q, k, v = rand_inputs(1, 9, 3, n, P, 64, torch.float32, gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(ops.tree_attention(q, k, v, mask))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_close(outs[0], oracle(q, k, v, mask[None]), torch.float32)


# ---- row invariance: what losslessness in every dtype rests on ------------------------------------------------

def _one_token_step(q, k, v, prefix, keys, row):
    """The decode step that produces tree node ``row``'s attention: its query over the prefix and its visible tree
    keys laid out as a committed cache (the last key, the node itself, as a one-node tree)."""
    idx = torch.tensor(list(range(prefix)) + [prefix + j for j in keys], device=k.device)
    return ops.tree_attention(q[:, :, row:row + 1].contiguous(), k[:, :, idx].contiguous(),
                              v[:, :, idx].contiguous(),
                              torch.ones(1, 1, 1, dtype=torch.bool, device=q.device))[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [0, 5, 127, 128, 130, 300])
def test_tree_node_equals_its_decode_step_bitwise(dtype, prefix):
    """A node at depth d over P prefix keys gives the bits of a one-token step over P + d cached keys, whatever
    the tree's size and shape (tiles of ranks cross the prefix/tree border at 127/128/130)."""
    gen = torch.Generator().manual_seed(prefix)
    parents = [-1, 0, 0, 1, 1, 2, 3, 5, 6, 7] + [8] * 50  # 60 nodes, depths up to 8
    mask = ancestor_mask(parents)
    q, k, v = rand_inputs(1, 9, 3, len(parents), prefix, 64, dtype, gen)
    out = ops.tree_attention(q, k, v, mask[None])
    assert_close(out, oracle(q, k, v, mask[None]), dtype)
    for i in range(len(parents)):
        keys = mask[i].nonzero().flatten().tolist()
        assert torch.equal(out[:, :, i], _one_token_step(q, k, v, prefix, keys, i)), f"node {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_does_not_depend_on_tree_size_position_or_threads(dtype):
    """The same node (same query, same ancestors) inside trees of 1..60 nodes, at other indices, with other
    siblings, computed with 1 or 2 threads: the same bits."""
    gen = torch.Generator().manual_seed(1)
    prefix, d = 200, 64
    k0, v0 = (torch.randn(1, 2, prefix + 3, d, generator=gen).to(dtype) for _ in range(2))
    qa = torch.randn(1, 4, 1, d, generator=gen).to(dtype)  # the node: depth 2, ancestors = the first 2 chain nodes
    want = None
    for extra, threads in ((0, 2), (10, 1), (57, 2)):
        n = 3 + extra
        parents = [-1, 0, 1] + [int(torch.randint(0, 3 + j, (1,), generator=gen)) for j in range(extra)]
        # place the node at the end, the others between: keys of the node's ancestors stay 0 and 1
        order = [0, 1] + list(range(3, n)) + [2]
        remap = {old: new for new, old in enumerate(order)}
        parents = [-1 if parents[old] < 0 else remap[parents[old]] for old in order]
        mask = ancestor_mask(parents)
        q = torch.randn(1, 4, n, d, generator=gen).to(dtype)
        q[:, :, n - 1:] = qa
        kt, vt = (torch.randn(1, 2, n, d, generator=gen).to(dtype) for _ in range(2))
        kt[:, :, [0, 1, n - 1]] = k0[:, :, prefix:]
        vt[:, :, [0, 1, n - 1]] = v0[:, :, prefix:]
        k, v = torch.cat([k0[:, :, :prefix], kt], 2), torch.cat([v0[:, :, :prefix], vt], 2)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = ops.tree_attention(q, k, v, mask[None])[:, :, n - 1]
        finally:
            torch.set_num_threads(before)
        want = got if want is None else want
        assert torch.equal(got, want), f"tree of {n} nodes, {threads} threads"


def test_too_many_nodes_raises():
    n = ops.MAX_TREE_NODES + 1
    q = torch.zeros(1, 1, n, 4)
    k = torch.zeros(1, 1, n, 4)
    with pytest.raises(ValueError, match="at most 1024 nodes"):
        ops.tree_attention(q, k, k, torch.ones(n, n, dtype=torch.bool))


def test_max_tree_nodes_is_the_kernels_limit():
    # MAX_TREE_NODES is written once in Python; the raw op (no Python checks) must take exactly that many nodes.
    def raw(n):
        q = torch.zeros(1, 1, n, 4)
        return torch.ops.hass.tree_attention(q, q, q, torch.eye(n, dtype=torch.bool)[None], None, 1.0)

    assert raw(ops.MAX_TREE_NODES).shape == (1, 1, ops.MAX_TREE_NODES, 4)
    with pytest.raises(RuntimeError, match="at most %d tree nodes" % ops.MAX_TREE_NODES):
        raw(ops.MAX_TREE_NODES + 1)


def test_general_mask_and_empty_rows():
    # Any bool mask works, not only ancestor masks; a row that sees nothing (no prefix) gives zeros.
    gen = torch.Generator().manual_seed(3)
    n = 9
    mask = torch.rand(2, n, n, generator=gen) < 0.4
    mask[1, 4] = False
    q, k, v = rand_inputs(2, 4, 4, n, 0, 16, torch.float32, gen)
    out = ops.tree_attention(q, k, v, mask)
    assert torch.all(out[1, :, 4] == 0)
    assert_close(out, oracle(q, k, v, mask), torch.float32)


def test_ragged_prefix_and_padded_trees():
    # Row 0: prefix 5 of 30 and a 4-node tree padded to 7 nodes; row 1: full prefix and 7 nodes.
    gen = torch.Generator().manual_seed(11)
    n, P = 7, 30
    mask = torch.zeros(2, n, n, dtype=torch.bool)
    mask[0, :4, :4] = ancestor_mask([-1, 0, 0, 1])
    mask[0, 4:, 4:] = torch.eye(3, dtype=torch.bool)  # padding nodes see themselves only
    mask[1] = make_tree("random", n, gen)[1]
    q, k, v = rand_inputs(2, 6, 2, n, P, 32, torch.float32, gen)
    pl = torch.tensor([5, P])
    out = ops.tree_attention(q, k, v, mask, prefix_lens=pl)
    assert_close(out, oracle(q, k, v, mask, prefix_lens=pl), torch.float32)
    # The real nodes of row 0 do not depend on the padded prefix slots nor on the padding nodes.
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:P] = 1e4
    v2[0, :, P + 4:] = -1e4
    out2 = ops.tree_attention(q, k2, v2, mask, prefix_lens=pl)
    torch.testing.assert_close(out2[0, :, :4], out[0, :, :4], rtol=0, atol=0)


def test_strided_cache_views():
    # k/v as slices of a preallocated cache [B, H, S_max, d] and a transposed q, as transformers passes them.
    gen = torch.Generator().manual_seed(5)
    B, n, P, d = 2, 6, 17, 16
    big_k = torch.randn(B, 2, 64, d, generator=gen)
    big_v = torch.randn(B, 2, 64, d, generator=gen)
    q = torch.randn(B, n, 6, d, generator=gen).transpose(1, 2)
    k, v = big_k[:, :, :P + n], big_v[:, :, :P + n]
    mask = make_tree("random", n, gen)[1]
    out = ops.tree_attention(q, k, v, mask)
    assert_close(out, oracle(q.contiguous(), k.contiguous(), v.contiguous(), mask[None]), torch.float32)


def test_fake_impl_opcheck():
    gen = torch.Generator().manual_seed(2)
    q, k, v = rand_inputs(1, 4, 2, 5, 8, 16, torch.float32, gen)
    mask = make_tree("random", 5, gen)[1][None]
    torch.library.opcheck(torch.ops.hass.tree_attention.default, (q, k, v, mask, None, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.zeros(1, 3, 10, 16), v=torch.zeros(1, 3, 10, 16)), "multiple of the key/value heads"),
    (dict(v=torch.zeros(1, 2, 10, 16, dtype=torch.float64)), "v must have dtype"),
    (dict(tree_mask=torch.ones(1, 4, 4, dtype=torch.bool)), r"tree_mask must be \[B, n, n\]"),
    (dict(tree_mask=torch.ones(1, 5, 5)), "tree_mask must have dtype torch.bool"),
    (dict(k=torch.zeros(1, 2, 3, 16), v=torch.zeros(1, 2, 3, 16)), "L = 3 < n"),
    (dict(prefix_lens=torch.tensor([6])), r"prefix_lens values must lie in \[0, L - n\]"),
    (dict(q=torch.zeros(1, 4, 5, 8)), "must be \\[..., B=1, Hkv, L, d=8\\]"),
])
def test_bad_inputs(bad, match):
    args = dict(q=torch.zeros(1, 4, 5, 16), k=torch.zeros(1, 2, 10, 16), v=torch.zeros(1, 2, 10, 16),
                tree_mask=torch.ones(1, 5, 5, dtype=torch.bool), prefix_lens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.tree_attention(**args)


# ---- transformers integration ----------------------------------------------------------------------------

def _tiny_llamas(impls):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hass_ext import register_hass_tree

    register_hass_tree()
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    models = [LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=i).eval() for i in impls]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    return cfg, models


@torch.no_grad()
def test_hf_llama_hass_tree_matches_float_mask():
    from transformers import DynamicCache

    cfg, (m_tree, m_eager, m_sdpa) = _tiny_llamas(["hass_tree", "eager", "sdpa"])
    assert m_tree.config._attn_implementation == "hass_tree"
    gen = torch.Generator().manual_seed(1)
    B, P, n = 2, 13, 9
    ids = torch.randint(0, 128, (B, P), generator=gen)
    caches = [DynamicCache(config=cfg) for _ in range(3)]
    pre_tree = m_tree(ids, past_key_values=caches[0]).logits
    pre_sdpa = m_sdpa(ids, past_key_values=caches[2]).logits
    m_eager(ids, past_key_values=caches[1])
    assert torch.equal(pre_tree, pre_sdpa)  # outside the tree path hass_tree *is* sdpa

    masks, depths = [], []
    for _ in range(B):
        parents, mask = make_tree("random", n, gen)
        masks.append(mask)
        depths.append(mask.sum(-1) - 1)
    tree_mask = torch.stack(masks)
    pos = P + torch.stack(depths)
    tokens = torch.randint(0, 128, (B, n), generator=gen)
    logits_tree = m_tree(tokens, position_ids=pos, past_key_values=caches[0], tree_mask=tree_mask).logits
    float_mask = torch.zeros(B, 1, n, P + n)
    float_mask[:, 0, :, P:] = torch.where(tree_mask, 0.0, torch.finfo(torch.float32).min)
    logits_eager = m_eager(tokens, position_ids=pos, past_key_values=caches[1], attention_mask=float_mask).logits
    torch.testing.assert_close(logits_tree, logits_eager, rtol=1e-5, atol=1e-5)
    # Without a tree mask (a plain causal chunk over the cache), hass_tree equals sdpa exactly again.
    same_cache = copy.deepcopy(caches[0])
    nxt = torch.randint(0, 128, (B, 3), generator=gen)
    assert torch.equal(m_tree(nxt, past_key_values=caches[0]).logits, m_sdpa(nxt, past_key_values=same_cache).logits)


@torch.no_grad()
def test_hf_llama_hass_tree_mask_forms_and_errors():
    """The batch mask [B, n, n] (the direct kernel call), a shared [n, n] mask and tree_prefix_lens (through
    ops.tree_attention's checks) give the same logits; a malformed mask is refused naming tree_mask."""
    from transformers import DynamicCache

    cfg, (m_tree,) = _tiny_llamas(["hass_tree"])
    gen = torch.Generator().manual_seed(2)
    P, n = 11, 6
    ids = torch.randint(0, 128, (1, P), generator=gen)
    cache = DynamicCache(config=cfg)
    m_tree(ids, past_key_values=cache)
    _, mask = make_tree("random", n, gen)
    pos = (P + mask.sum(-1) - 1)[None]
    tokens = torch.randint(0, 128, (1, n), generator=gen)

    def tree_logits(**kw):
        c = copy.deepcopy(cache)
        return m_tree(tokens, position_ids=pos, past_key_values=c, **kw).logits

    ref = tree_logits(tree_mask=mask[None])
    assert torch.equal(tree_logits(tree_mask=mask), ref)
    assert torch.equal(tree_logits(tree_mask=mask[None], tree_prefix_lens=torch.tensor([P])), ref)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_logits(tree_mask=mask[None, :, :-1])
    with pytest.raises(ValueError, match="tree_mask"):
        tree_logits(tree_mask=mask[None].float())


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("shape", [(1, 32, 8, 60, 1000), (2, 6, 2, 1, 0), (3, 9, 3, 64, 130), (1, 4, 4, 100, 4097)])
def test_cuda_matches_oracle(dtype, d, shape):
    B, Hq, Hkv, n, P = shape
    gen = torch.Generator().manual_seed(n + P + d)
    masks = torch.stack([make_tree("random", n, gen)[1] for _ in range(B)])
    q, k, v = rand_inputs(B, Hq, Hkv, n, P, d, dtype, gen)
    ref = oracle(q, k, v, masks)
    out = ops.tree_attention(q.cuda(), k.cuda(), v.cuda(), masks.cuda())
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.cpu(), ref, dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
def test_cuda_ragged_prefix_strided():
    gen = torch.Generator().manual_seed(4)
    B, n, P, d = 3, 7, 300, 64
    masks = torch.stack([make_tree("random", n, gen)[1] for _ in range(B)])
    big = torch.randn(2, B, 4, 512, d, generator=gen, dtype=torch.bfloat16)
    q = torch.randn(B, n, 8, d, generator=gen, dtype=torch.bfloat16).transpose(1, 2)
    k, v = big[0, :, :, :P + n], big[1, :, :, :P + n]
    pl = torch.tensor([0, 150, P])
    ref = ops.tree_attention(q, k, v, masks, prefix_lens=pl)
    out = ops.tree_attention(q.cuda(), k.cuda(), v.cuda(), masks.cuda(), prefix_lens=pl.cuda())
    assert_close(out.cpu(), ref, torch.bfloat16)


def test_benchmark_quick(tmp_path):
    # bench/bench_tree_attention.py --quick runs end to end and writes its JSON and Markdown tables.
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "bench", "bench_tree_attention.py"), "--quick", "--device", "cpu",
                    "--reps", "1", "--out", str(tmp_path)], check=True, capture_output=True, timeout=300)
    res = json.loads((tmp_path / "attention_cpu_quick.json").read_text())
    assert len(res["tree"]) == 2 and res["align"]["peak_mib"]["oracle fwd+bwd"] >= 0
    # what users would otherwise run: transformers' repeat_kv + float-mask SDPA, and causal SDPA (the ceiling)
    assert set(res["tree"][0]["times_s"]) >= {"hass tree_attention", "transformers sdpa (repeat_kv + float mask)",
                                               "causal SDPA, same keys (ceiling)"}
    assert all(t > 0 for t in res["tree"][0]["times_s"].values())
    assert res["tree"][0]["ratio_vs_transformers"] > 0 and res["tree"][0]["ratio_vs_causal"] > 0
    assert "Tree attention" in (tmp_path / "attention_cpu_quick.md").read_text()
    subprocess.run([sys.executable, os.path.join(root, "bench", "bench_tree_attention.py"), "--quick", "--decode",
                    "--device", "cpu", "--reps", "1", "--out", str(tmp_path)], check=True, capture_output=True,
                   timeout=300)
    res = json.loads((tmp_path / "attention_decode_cpu_quick.json").read_text())
    assert [(r["prefix"], r["n"]) for r in res["decode"]] == [(32, 6)]
    assert all(t > 0 for t in res["decode"][0]["times_s"].values())
    assert "hass / transformers sdpa" in (tmp_path / "attention_decode_cpu_quick.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("P", [0, 700, 4096])
def test_cuda_row_does_not_depend_on_tree_size(dtype, d, P):
    # The split plan over the prefix depends on the prefix length, never on n: the first nodes of a tree give
    # bit-identical rows whether the tree has 16, 60 or 100 nodes (100 nodes x 4 heads: two row blocks).
    gen = torch.Generator().manual_seed(P + d)
    Hq, Hkv, n = 32, 8, 100
    parents, mask = make_tree("random", n, gen)
    q, k, v = rand_inputs(1, Hq, Hkv, n, P, d, dtype, gen, device="cuda")
    outs = {}
    for m in (16, 60, 100):
        kk = torch.cat([k[:, :, :P], k[:, :, P:P + m]], 2)
        vv = torch.cat([v[:, :, :P], v[:, :, P:P + m]], 2)
        outs[m] = ops.tree_attention(q[:, :, :m].contiguous(), kk, vv, mask[None, :m, :m].cuda())
    assert torch.equal(outs[16], outs[60][:, :, :16]) and torch.equal(outs[60], outs[100][:, :, :60])
    assert_close(outs[100].cpu(), oracle(q.cpu(), k.cpu(), v.cpu(), mask[None]), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 513), (1, 4, 1, 1024, 64), (4, 28, 4, 5, 2000)])
def test_cuda_large_trees_and_batches(dtype, shape):
    # Many mask words a row (n up to 1024), several row blocks per KV head, batch rows with their own ragged
    # prefixes (chunks past a row's prefix are empty splits).
    B, Hq, Hkv, n, P = shape
    gen = torch.Generator().manual_seed(n + P)
    masks = torch.stack([make_tree("random", n, gen)[1] for _ in range(B)])
    q, k, v = rand_inputs(B, Hq, Hkv, n, P, 128, dtype, gen)
    pl = torch.randint(0, P + 1, (B,), generator=gen)
    pl[0] = P
    out = ops.tree_attention(q.cuda(), k.cuda(), v.cuda(), masks.cuda(), prefix_lens=pl.cuda())
    assert_close(out.cpu(), oracle(q, k, v, masks, prefix_lens=pl), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and hass_ext's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("prefix", [0, 5, 255, 256, 300, 1000])
def test_cuda_tree_node_equals_its_decode_step_bitwise(dtype, d, prefix):
    # The rank-order kernel (trees of up to 128 nodes): chunks of 256 ranks and tiles of 32 cross the prefix/tree
    # border at 255/256/300; 32 query heads over 8 KV heads, a 60-node tree of depth up to 8.
    gen = torch.Generator().manual_seed(prefix + d)
    parents = [-1, 0, 0, 1, 1, 2, 3, 5, 6, 7] + [8] * 50
    mask = ancestor_mask(parents).cuda()
    q, k, v = rand_inputs(1, 32, 8, len(parents), prefix, d, dtype, gen, device="cuda")
    out = ops.tree_attention(q, k, v, mask[None])
    assert_close(out.cpu(), oracle(q.cpu(), k.cpu(), v.cpu(), mask[None].cpu()), dtype)
    for i in range(len(parents)):
        keys = mask[i].nonzero().flatten().tolist()
        assert torch.equal(out[:, :, i], _one_token_step(q, k, v, prefix, keys, i)), f"node {i}"
