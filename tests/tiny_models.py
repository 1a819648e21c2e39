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


def agreeing_draft(target, sequences, steps=300, lr=3e-3):
    """A draft fitted EAGLE-style (feature regression + soft cross-entropy) to the target's own continuations
    ``sequences`` (cut to the shortest), so that rounds accept several tokens."""
    import hass_ext

    draft = hass_ext.init_draft(target, seed=0)
    n = min(s.numel() for s in sequences)
    with torch.no_grad():
        pre = [target.prefill(s[None, :n], all_logits=True) for s in sequences]
        f = torch.stack([p.hidden_states[0].clone() for p in pre])
        p = torch.stack([torch.softmax(x.logits[0].float(), -1) for x in pre])
    ids = torch.stack([s[:n] for s in sequences])
    opt = torch.optim.AdamW([q for q in draft.parameters() if q.requires_grad], lr=lr, betas=(0.9, 0.95))
    draft.train()
    for _ in range(steps):
        # pair (f_t, x_{t+1}) -> regress f_{t+1}, distill p_{t+1} (the target's distribution of x_{t+2})
        out = draft(ids[:, 1:], f[:, :-1])
        logq = torch.log_softmax(draft.logits(out), -1)
        loss = torch.nn.functional.smooth_l1_loss(out, f[:, 1:]) - 0.1 * (p[:, 1:] * logq).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()
