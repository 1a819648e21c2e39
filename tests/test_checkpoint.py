"""Draft checkpoints in the EAGLE/HASS layout: synthetic published-style folders, round trips, bad files."""
import json
import os

import pytest
import torch

import hass_ext
from hass_ext.draft_io import CheckpointError, load_draft, save_draft
from tiny_models import tiny_target



@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=1, vocab=40, hidden=32, heads=4, kv_heads=2, rope_theta=30000.0)


def _eagle_config(target, **kw):
    """A config.json as the EAGLE/HASS releases write it (LlamaConfig 4.x style, no head_dim)."""
    c = target.config
    cfg = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": 48,
           "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-05,
           "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.28.1",
           "use_cache": True, "vocab_size": c.vocab_size, "rope_theta": 30000.0, "bias": False}
    cfg.update(kw)
    return cfg


def _eagle_weights(cfg, fc_bias=True, embed=True, dtype=torch.float32, seed=0, extra=()):
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def r(*shape):
        return (torch.randn(shape, generator=g) * 0.1).to(dtype)

    sd = {"fc.weight": r(H, 2 * H), "layers.0.self_attn.q_proj.weight": r(H, H),
          "layers.0.self_attn.k_proj.weight": r(kv, H), "layers.0.self_attn.v_proj.weight": r(kv, H),
          "layers.0.self_attn.o_proj.weight": r(H, H), "layers.0.mlp.gate_proj.weight": r(I, H),
          "layers.0.mlp.up_proj.weight": r(I, H), "layers.0.mlp.down_proj.weight": r(H, I),
          "layers.0.post_attention_layernorm.weight": (1 + r(H)).to(dtype)}
    if fc_bias:
        sd["fc.bias"] = r(H)
    if embed:
        sd["embed_tokens.weight"] = r(V, H)
    for k in extra:
        sd[k] = r(d // 2)
    return sd


def _write(folder, cfg, sd, fmt):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))


def _in_memory_reference(cfg, sd, target):
    """Build the draft by hand from the same tensors (fp32) as the loader should."""
    from hass_ext.draft import DraftConfig, DraftModel

    c = DraftConfig.from_dict(cfg)
    c.bias = "fc.bias" in sd
    m = DraftModel(c)
    full = {k: v.float() for k, v in sd.items() if "rotary" not in k}
    full.setdefault("embed_tokens.weight", target.model.model.embed_tokens.weight.detach().clone())
    m.load_state_dict(full)
    m.set_lm_head(target.model.lm_head.weight)
    return m.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("fc_bias,embed,dtype", [(True, True, torch.float32), (False, False, torch.float16),
                                                 (True, False, torch.float16), (False, True, torch.float32)])
def test_published_layout_loads_and_matches(tmp_path, target, fmt, fc_bias, embed, dtype):
    cfg = _eagle_config(target, bias=fc_bias)
    sd = _eagle_weights(cfg, fc_bias=fc_bias, embed=embed, dtype=dtype, extra=["layers.0.self_attn.rotary_emb.inv_freq"])
    _write(tmp_path / "draft", cfg, sd, fmt)
    draft = load_draft(tmp_path / "draft", target=target)
    assert draft.dtype == torch.float32 and draft.config.bias == fc_bias
    assert draft.lm_head_weight is target.model.lm_head.weight
    if not embed:
        assert torch.equal(draft.embed_tokens.weight, target.model.model.embed_tokens.weight)
    ref = _in_memory_reference(cfg, sd, target)
    ids, feats = torch.randint(0, 40, (1, 11)), torch.randn(1, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(draft.logits(draft(ids, feats)), ref.logits(ref(ids, feats)))


def test_bias_follows_the_weights_not_the_config(tmp_path, target):
    cfg = _eagle_config(target, bias=False)  # HASS training writes fc.bias whatever the config says (docs/algorithms.md#p2-fc-bias)
    _write(tmp_path / "d", cfg, _eagle_weights(cfg, fc_bias=True), "bin")
    with pytest.warns(UserWarning, match="config says bias=False but the weights have fc.bias"):
        draft = load_draft(tmp_path / "d", target=target)
    assert draft.fc.bias is not None


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_save_load_round_trip(tmp_path, target, fmt):
    draft = hass_ext.init_draft(target, seed=3)
    with torch.no_grad():
        draft.fc.bias.normal_()
    out = save_draft(draft, tmp_path / "rt", safe_serialization=(fmt == "safetensors"))
    files = sorted(os.listdir(out))
    assert files == sorted(["config.json", "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"])
    back = load_draft(out, target=target)
    for (k, a), (k2, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # no target: the checkpoint's own embedding and dtype, CPU, no head
    alone = load_draft(out)
    assert alone.lm_head_weight is None and alone.dtype == torch.float32
    # save into the existing folder in the other format: the old weights file goes away
    save_draft(back, out, safe_serialization=(fmt != "safetensors"), dtype=torch.float16)
    assert sorted(os.listdir(out)) == sorted(["config.json", "pytorch_model.bin" if fmt == "safetensors"
                                              else "model.safetensors"])
    half = load_draft(out, target=target)
    torch.testing.assert_close(half.fc.weight, draft.fc.weight, rtol=1e-3, atol=1e-3)


def test_save_without_embedding_in_bf16(tmp_path, target):
    """The shipped layout: bf16 weights, no embed_tokens (copied back from the target on load)."""
    from safetensors import safe_open

    draft = hass_ext.init_draft(target, seed=5)
    out = save_draft(draft, tmp_path / "slim", dtype=torch.bfloat16, embedding=False)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "embed_tokens.weight" not in keys and "fc.weight" in keys
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    back = load_draft(out, target=target)
    assert torch.equal(back.embed_tokens.weight, target.model.get_input_embeddings().weight.to(back.dtype))
    torch.testing.assert_close(back.fc.weight.float(), draft.fc.weight.float(), rtol=1e-2, atol=1e-2)


def test_saved_config_is_an_eagle_llama_config(tmp_path, target):
    from transformers import AutoConfig

    draft = hass_ext.init_draft(target)
    path = save_draft(draft, tmp_path / "cfg")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    for key, value in {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                       "bias": True, "rope_theta": 30000.0, "hidden_size": 32, "vocab_size": 40,
                       "num_key_value_heads": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}.items():
        assert raw[key] == value, key
    hf = AutoConfig.from_pretrained(path)  # what SGLang/vLLM parse the draft config with
    assert hf.model_type == "llama" and hf.num_hidden_layers == 1 and hf.hidden_size == 32
    from safetensors.torch import load_file

    keys = set(load_file(os.path.join(path, "model.safetensors")))
    assert keys == {"embed_tokens.weight", "fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight",
                    "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                    "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
                    "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
                    "layers.0.post_attention_layernorm.weight"}


def test_qwen2_style_qkv_bias_round_trip(tmp_path):
    tgt = tiny_target("qwen2", seed=2)
    draft = hass_ext.init_draft(tgt)
    back = load_draft(save_draft(draft, tmp_path / "q"), target=tgt)
    assert back.config.qkv_bias and back.layers[0].self_attn.k_proj.bias is not None


def test_bad_checkpoints(tmp_path, target):
    cfg = _eagle_config(target, bias=True)
    sd = _eagle_weights(cfg)
    with pytest.raises(CheckpointError, match="folder not found"):
        load_draft(tmp_path / "nope", target=target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_draft(tmp_path / "empty")
    _write(tmp_path / "noweights", cfg, sd, "bin")
    os.remove(tmp_path / "noweights" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="has no weights"):
        load_draft(tmp_path / "noweights")
    _write(tmp_path / "badjson", cfg, sd, "bin")
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_draft(tmp_path / "badjson")
    for fmt, name in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        folder = tmp_path / f"trunc-{fmt}"
        _write(folder, cfg, sd, fmt)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt"):
            load_draft(folder, target=target)
    _write(tmp_path / "shape", cfg, {**sd, "fc.weight": torch.zeros(32, 32)}, "bin")
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(32, 32\), the config implies \(32, 64\)"):
        load_draft(tmp_path / "shape", target=target)
    missing = dict(sd)
    del missing["layers.0.mlp.up_proj.weight"]
    _write(tmp_path / "missing", cfg, missing, "bin")
    with pytest.raises(CheckpointError, match="missing keys.*up_proj"):
        load_draft(tmp_path / "missing", target=target)
    _write(tmp_path / "extra", cfg, {**sd, "lm_head.weight": torch.zeros(40, 32)}, "bin")
    with pytest.raises(CheckpointError, match="unexpected keys.*lm_head.weight"):
        load_draft(tmp_path / "extra", target=target)
    _write(tmp_path / "noembed", cfg, {k: v for k, v in sd.items() if k != "embed_tokens.weight"}, "bin")
    with pytest.raises(CheckpointError, match="no embed_tokens.weight; pass target="):
        load_draft(tmp_path / "noembed")
    torch.save({"fc.weight": [1, 2]}, tmp_path / "noembed" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="corrupt|flat dict of tensors"):
        load_draft(tmp_path / "noembed")


def test_mismatched_target(tmp_path, target):
    cfg = _eagle_config(target, vocab_size=41)
    _write(tmp_path / "v", cfg, _eagle_weights(cfg), "safetensors")
    with pytest.raises(ValueError, match="draft does not match the target: draft vocab_size=41"):
        load_draft(tmp_path / "v", target=target)
    other = tiny_target("llama", hidden=48, heads=4, kv_heads=2, vocab=40)
    draft = hass_ext.init_draft(other)
    path = save_draft(draft, tmp_path / "h")
    with pytest.raises(ValueError, match="hidden_size=48; target lm_head has vocab 40, hidden 32"):
        load_draft(path, target=target)


def test_failed_save_leaves_no_partial_folder(tmp_path, target, monkeypatch):
    """A write failing after the weights (disk full at the config) leaves neither the folder nor a temporary."""
    import hass_ext.draft_io as draft_io

    draft = hass_ext.init_draft(target)
    real = draft_io.atomic_write_bytes

    def boom(path, data):
        if path.endswith("config.json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(draft_io, "atomic_write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_draft(draft, tmp_path / "x")
    assert os.listdir(tmp_path) == []


# The upstream EAGLE/HASS draft (model/cnets.py, EAGLE-1/2 and HASS): its state dict, which their loader reads
# with strict=True after building the module from config.json.
UPSTREAM_KEYS = {"embed_tokens.weight", "fc.weight", "layers.0.self_attn.q_proj.weight",
                 "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                 "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                 "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"}


@pytest.mark.parametrize("fc_bias", [True, False])
def test_saved_keys_are_the_upstream_draft_layout(tmp_path, target, fc_bias):
    """save_draft writes the embedding by default, so the upstream loaders (strict) take the folder unchanged."""
    from safetensors import safe_open

    draft = hass_ext.init_draft(target, seed=2, bias=fc_bias)
    out = save_draft(draft, tmp_path / "d")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        emb = f.get_tensor("embed_tokens.weight")
    assert keys == UPSTREAM_KEYS | ({"fc.bias"} if fc_bias else set())
    assert torch.equal(emb, target.model.get_input_embeddings().weight)
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["bias"] == fc_bias and cfg["num_hidden_layers"] == 1
    slim = save_draft(draft, tmp_path / "slim", embedding=False)
    with safe_open(os.path.join(slim, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys - {"embed_tokens.weight"}


def test_bad_optional_tree_profile_is_ignored_with_a_warning(tmp_path, target):
    path = save_draft(hass_ext.init_draft(target, seed=0), tmp_path / "d")
    with open(os.path.join(path, "tree_profile.json"), "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="ignoring the tree profile .*tree_profile.json is not valid JSON"):
        draft = load_draft(path, target=target)
    assert draft.tree_profile is None and draft.fc.weight.shape[0] == target.config.hidden_size


def test_saved_draft_has_the_usual_permissions(tmp_path, target):
    """The atomic writes (temporary folder/files, then rename) do not leave the folder or its files private."""
    import stat

    draft = hass_ext.init_draft(target, seed=0)
    path = hass_ext.save_draft(draft, tmp_path / "d")    # a new folder
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~umask
    hass_ext.save_draft(draft, path)                     # into the existing folder, file by file
    for name in os.listdir(path):
        assert stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) == 0o666 & ~umask, name
