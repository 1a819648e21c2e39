"""Tiny random targets (Llama, Qwen2, Mistral) wrapped as hass_ext.Target, for fast CPU tests."""
import torch


class StubTokenizer:
    """Just enough of a tokenizer for Target/generate with token-id prompts."""
    chat_template = None

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def tiny_config(family="llama", vocab=32, hidden=32, layers=2, heads=4, kv_heads=2, max_pos=512, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    args = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mistral":
        args["sliding_window"] = None
    args.update(kw)
    return cls(**args)


def tiny_target(family="llama", seed=0, dtype=torch.float32, eos_token_id=None, scale=1.0, **kw):
    """A random causal LM; ``scale`` multiplies the lm_head (larger = peakier distributions)."""
    from transformers import AutoModelForCausalLM

    from hass_ext.target import Target

    config = tiny_config(family, **kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = eos_token_id
    return Target(model.eval(), StubTokenizer(eos_token_id), f"tiny-{family}")
