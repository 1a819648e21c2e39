"""DraftModel: the EAGLE-1/2 head against transformers' Llama layer, RoPE variants, the draft KV cache, init."""
import math

import pytest
import torch

import hass_ext
from hass_ext.draft import DraftCache, DraftConfig, DraftModel, apply_rotary, rope_inv_freq
from tiny_models import tiny_target



def _config(**kw):
    args = dict(vocab_size=50, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=256)
    args.update(kw)
    return DraftConfig(**args)


def _random_draft(config, seed=0):
    torch.manual_seed(seed)
    d = DraftModel(config)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    d.set_lm_head(torch.randn(config.vocab_size, config.hidden_size))
    return d.eval()


def _hf_reference(draft, input_ids, features):
    """The same computation with transformers' LlamaDecoderLayer (input norm removed) and its rotary."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    c = draft.config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {**c.rope_scaling, "rope_theta": c.rope_theta}
    lc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                     head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_parameters=rope,
                     max_position_embeddings=max(c.max_position_embeddings, 16384), attention_bias=c.qkv_bias)
    lc._attn_implementation = "eager"
    layer = LlamaDecoderLayer(lc, 0)
    sd = {k[len("layers.0."):]: v for k, v in draft.state_dict().items() if k.startswith("layers.0.")}
    if c.qkv_bias:  # transformers' attention_bias also gives o_proj a bias: keep it at zero
        sd["self_attn.o_proj.bias"] = torch.zeros(c.hidden_size)
    sd["input_layernorm.weight"] = torch.ones(c.hidden_size)
    layer.load_state_dict(sd)
    layer.input_layernorm = torch.nn.Identity()
    rot = LlamaRotaryEmbedding(lc)
    L = input_ids.shape[1]
    pos = torch.arange(L)[None]
    x = draft.fc(torch.cat([draft.embed_tokens(input_ids), features], -1))
    mask = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
    return layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rot(x, pos))


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 6}, {"qkv_bias": True, "bias": False},
                                {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                                {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}])
def test_forward_matches_transformers_llama_layer(kw):
    d = _random_draft(_config(**kw))
    ids, feats = torch.randint(0, 50, (2, 13)), torch.randn(2, 13, 48)
    with torch.no_grad():
        ours, ref = d(ids, feats), _hf_reference(d, ids, feats)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    lc = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_parameters={**scaling, "rope_theta": 500000.0})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](lc, "cpu")
    ours = rope_inv_freq(_config(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                 rope_theta=500000.0, rope_scaling=scaling))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_pieces_compose_to_forward():
    """project + rotary + apply_rotary + attention projections + mlp_block == forward (the alignment building blocks)."""
    d = _random_draft(_config())
    ids, feats = torch.randint(0, 50, (1, 9)), torch.randn(1, 9, 48)
    with torch.no_grad():
        x = d.project(ids, feats)
        cos, sin = d.rotary(torch.arange(9)[None])
        attn = d.layers[0].self_attn
        B, L, _ = x.shape
        q = apply_rotary(attn.q_proj(x).view(B, L, 6, 8).transpose(1, 2), cos, sin)
        k = apply_rotary(attn.k_proj(x).view(B, L, 2, 8).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(B, L, 2, 8).transpose(1, 2)
        k, v = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
        h = d.layers[0].mlp_block(x + attn.o_proj(o))
        torch.testing.assert_close(h, d(ids, feats), rtol=1e-5, atol=1e-5)


def test_cache_incremental_and_tree_mask():
    d = _random_draft(_config(), seed=3)
    ids, feats = torch.randint(0, 50, (1, 12)), torch.randn(1, 12, 48)
    with torch.no_grad():
        full = d(ids, feats)
        cache = DraftCache(d.config, 1, torch.float32, "cpu", capacity=4)  # forces growth
        parts = []
        for a, b in ((0, 5), (5, 6), (6, 12)):
            parts.append(d(ids[:, a:b], feats[:, a:b], cache=cache))
            cache.length = b
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        # Three "tree nodes" after a context of 8: node 2 is the child of node 0, node 1 a sibling of node 0.
        cache.length = 8
        tok, f = ids[:, 8:11], feats[:, 8:11]
        pos = torch.tensor([[8, 8, 9]])
        tree = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
        mask = torch.cat([torch.ones(3, 8, dtype=torch.bool), tree], 1)
        out = d(tok, f, position_ids=pos, cache=cache, attn_mask=mask)
        assert cache.length == 8
        # node 2 sees context + node 0 + itself == the chain (ids[8], ids[10]) at positions 8, 9
        chain_ids, chain_f = torch.stack([ids[:, 8], ids[:, 10]], 1), torch.stack([feats[:, 8], feats[:, 10]], 1)
        ref = d(chain_ids, chain_f, cache=cache)
        torch.testing.assert_close(out[:, [0, 2]], ref, rtol=1e-5, atol=1e-5)
        ref1 = d(ids[:, 9:10], feats[:, 9:10], cache=cache)
        torch.testing.assert_close(out[:, 1], ref1[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_init_draft_from_target(family):
    tgt = tiny_target(family, rope_theta=20000.0) if family != "qwen2" else tiny_target(family)
    d = hass_ext.init_draft(tgt, seed=5)
    c = d.config
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (32, 32, 4, 2)
    assert c.qkv_bias == (family == "qwen2") and c.bias
    if family != "qwen2":
        assert c.rope_theta == 20000.0
    assert torch.equal(d.embed_tokens.weight, tgt.model.model.embed_tokens.weight)
    assert not d.embed_tokens.weight.requires_grad
    assert d.lm_head_weight is tgt.model.lm_head.weight  # referenced, not copied
    assert "lm_head.weight" not in d.state_dict() and not any("rotary" in k for k in d.state_dict())
    again = hass_ext.init_draft(tgt, seed=5)
    other = hass_ext.init_draft(tgt, seed=6)
    assert torch.equal(d.fc.weight, again.fc.weight) and not torch.equal(d.fc.weight, other.fc.weight)
    assert torch.count_nonzero(d.fc.bias) == 0
    out = d(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 32))
    assert d.logits(out).shape == (1, 3, 32)


def test_llama3_target_rope_scaling_is_carried():
    tgt = tiny_target("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 128})
    c = hass_ext.init_draft(tgt).config
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0


def test_config_errors():
    with pytest.raises(ValueError, match="num_attention_heads .* multiple of num_key_value_heads"):
        _config(num_key_value_heads=4)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        _config(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3 rope_scaling needs low_freq_factor"):
        _config(rope_scaling={"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="missing"):
        DraftConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="hidden_act"):
        _config(hidden_act="gelu")
    d = DraftModel(_config())
    with pytest.raises(RuntimeError, match="no lm_head"):
        d.logits(torch.zeros(1, 48))
    with pytest.raises(ValueError, match=r"lm_head weight of shape \(50, 48\)"):
        d.set_lm_head(torch.zeros(49, 48))


def test_config_dict_round_trip_and_transformers5_rope_parameters():
    raw = {"vocab_size": 50, "hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 6,
           "rope_parameters": {"rope_type": "linear", "rope_theta": 1234.0, "factor": 2.0}, "custom_key": 7}
    c = DraftConfig.from_dict(raw)
    assert c.rope_theta == 1234.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.num_key_value_heads == 6 and c.head_dim == 8
    d = c.to_dict()
    assert d["custom_key"] == 7 and d["architectures"] == ["LlamaForCausalLM"] and d["num_hidden_layers"] == 1
    assert DraftConfig.from_dict(d) == c


def test_init_draft_with_sizes_conflicting_with_the_target_is_one_clear_error():
    tgt = tiny_target("llama")
    with pytest.raises(ValueError, match="draft does not match the target: draft vocab_size=64"):
        hass_ext.init_draft(tgt, vocab_size=64)
    with pytest.raises(ValueError, match="draft does not match the target: .*hidden_size=48"):
        hass_ext.init_draft(tgt, hidden_size=48)
    with pytest.raises(ValueError, match=r"unknown draft config options \['vocab'\]"):
        hass_ext.init_draft(tgt, vocab=64)


def test_context_pass_appends_to_the_cache_and_returns_the_last_output():
    from hass_ext.draft import context_pass

    tgt = tiny_target("llama")
    d = hass_ext.init_draft(tgt, seed=1)
    feats, ids = torch.randn(5, 32), torch.tensor([1, 2, 3, 4, 5])
    cache = d.new_cache()
    last = context_pass(d, cache, feats[:3], ids[:3])
    assert cache.length == 3
    last2 = context_pass(d, cache, feats[3:], ids[3:])
    assert cache.length == 5
    whole = d(ids[None], feats[None])
    torch.testing.assert_close(last, whole[0, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, whole[0, 4], rtol=1e-5, atol=1e-5)
