"""The draft model: the EAGLE-1/2 head that HASS trains (one decoder layer over [token embedding, target feature]).

At position t the draft reads the pair (f_t, x_{t+1}) — the target's final-norm hidden state at t and the next
token — and predicts f_{t+1}; the target's lm_head turns the prediction into a distribution over x_{t+2}:

    x   = fc(concat(embed(x_{t+1}), f_t))          embedding first, feature second
    h   = x + o_proj(Attn(x))                      layer 0 has no input norm
    out = h + MLP(post_attention_layernorm(h))     SwiGLU; no final norm
    logits = out @ lm_head.T                       the target's head, referenced, never copied or saved

Module names equal the keys of the published EAGLE/HASS checkpoints (``embed_tokens``, ``fc``,
``layers.0.self_attn.q_proj``, ...), so ``state_dict()`` is the checkpoint layout. RoPE is recomputed in fp32
from the config (rope_theta, linear or llama3 rope_scaling) and is not part of the state dict.

The pieces the HASS multi-stream alignment forward is built from are public: ``project`` (fc over
[embedding, feature]), ``rotary`` and ``apply_rotary``, the layer's ``self_attn`` projections and ``mlp_block``.
"""
import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.compact_kv import compact_kv
from .ops.small_linear import linear, tensor_version, use_small_linear

_ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys that to_dict() always writes itself (so they are not carried in DraftConfig.extra)
_FIXED_KEYS = ("architectures", "model_type", "pretraining_tp", "tie_word_embeddings", "use_cache", "mlp_bias",
               "attention_bias", "torch_dtype", "dtype", "transformers_version")


# ---- configuration ------------------------------------------------------------------------------------------

@dataclass
class DraftConfig:
    """The draft's hyper-parameters, read from and written to an EAGLE-style ``config.json``."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None      # default: num_attention_heads (MHA)
    head_dim: Optional[int] = None                 # default: hidden_size // num_attention_heads
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None            # None, {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    bias: bool = True                              # fc bias (EAGLE's "bias" key)
    qkv_bias: bool = False                         # q/k/v projection biases (Qwen2 targets)
    hidden_act: str = "silu"
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)      # other keys of config.json, kept for the round trip

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "num_hidden_layers", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"draft config: {name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"draft config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"draft config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"draft config: hidden_act must be 'silu' (the EAGLE draft's SwiGLU), got "
                             f"{self.hidden_act!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"draft config: rope_theta must be > 0, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"draft config: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> "DraftConfig":
        """Read an EAGLE/HASS ``config.json`` (LlamaConfig-style) or a transformers 5 ``rope_parameters`` one."""
        if not isinstance(raw, dict):
            raise ValueError(f"draft config must be a JSON object, got {type(raw).__name__}")
        d = dict(raw)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"draft config is missing {missing}")
        rope_theta, rope_scaling = d.pop("rope_theta", None), d.pop("rope_scaling", None)
        params = d.pop("rope_parameters", None)
        if isinstance(params, dict):  # transformers 5 layout: theta and scaling in one dict
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", params.get("type", "default")) != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        names = {f.name for f in fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        if d.get("attention_bias") and "qkv_bias" not in known:
            known["qkv_bias"] = True
        for k in _FIXED_KEYS:
            d.pop(k, None)
        return cls(rope_theta=float(rope_theta) if rope_theta is not None else 10000.0, rope_scaling=rope_scaling,
                   extra=d, **known)

    def to_dict(self) -> dict:
        """The EAGLE ``config.json`` fields (loadable by the EAGLE/HASS reference, SGLang and vLLM)."""
        out = dict(self.extra)
        out.update({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "initializer_range": self.initializer_range,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bias": bool(self.bias),
            "qkv_bias": bool(self.qkv_bias),
            "mlp_bias": False,
        })
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_target(cls, target_config, **overrides) -> "DraftConfig":
        """A draft config matching a transformers target config (sizes, heads, RoPE, Qwen2-style q/k/v bias)."""
        c = target_config
        params = getattr(c, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            theta = params["rope_theta"]
            kind = params.get("rope_type", params.get("type", "default"))
            scaling = {k: v for k, v in params.items() if k != "rope_theta"} if kind != "default" else None
        else:
            theta, scaling = getattr(c, "rope_theta", 10000.0), getattr(c, "rope_scaling", None)
        qkv_bias = getattr(c, "model_type", "") == "qwen2" or bool(getattr(c, "attention_bias", False))
        eos = getattr(c, "eos_token_id", None)
        kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                  head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                  rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
                  rope_scaling=scaling, max_position_embeddings=int(getattr(c, "max_position_embeddings", 2048)),
                  qkv_bias=qkv_bias, hidden_act=getattr(c, "hidden_act", "silu"),
                  pad_token_id=getattr(c, "pad_token_id", None), bos_token_id=getattr(c, "bos_token_id", None),
                  eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos)
        kw.update(overrides)
        return cls(**kw)


def _normalise_rope_scaling(scaling):
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"draft config: rope_scaling must be null or an object, got {scaling!r}")
    s = dict(scaling)
    kind = s.pop("rope_type", None) or s.pop("type", None) or "default"
    s.pop("type", None)
    if kind == "default":
        return None
    if kind not in _ROPE_TYPES:
        raise ValueError(f"draft config: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    if not (isinstance(s.get("factor"), (int, float)) and s["factor"] > 0):
        raise ValueError(f"draft config: rope_scaling {kind} needs a factor > 0, got {scaling!r}")
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in s:
                raise ValueError(f"draft config: llama3 rope_scaling needs {k}, got {scaling!r}")
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ValueError(f"draft config: llama3 rope_scaling needs high_freq_factor > low_freq_factor, "
                             f"got {scaling!r}")
    return {"rope_type": kind, **s}


# ---- rotary embedding ---------------------------------------------------------------------------------------

def rope_inv_freq(config: DraftConfig, device=None) -> torch.Tensor:
    """The RoPE inverse frequencies ``[head_dim / 2]`` in fp32 (default, linear or llama3 scaling)."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    s = config.rope_scaling
    if s is None:
        pass
    elif s["rope_type"] == "linear":
        inv = inv / s["factor"]
    else:  # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, torch.where(wavelen < old_len / hi, inv, blended))
    return inv.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (HF rotate-half convention) on ``x [B, heads, L, d]`` with ``cos, sin [B, L, d]``, computed in fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ---- layers -------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections of ``x [B, L, H]`` as ``[B, heads, L, d]``, RoPE applied to q and k."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, cache_pos: int = 0, attn_mask=None):
        """Attention of the L new positions over the cached keys ``[0, cache_pos)`` and themselves.

        attn_mask: bool ``[L, cache_pos + L]`` or ``[B, L, cache_pos + L]`` (True = attend) or None for causal
        order.
        """
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(layer_idx, cache_pos, k, v)
        L, S = q.shape[2], k.shape[2]
        if attn_mask is not None and attn_mask.dim() == 3:  # one mask per batch row: [B, L, S]
            attn_mask = attn_mask[:, None]
        if attn_mask is None and S > L:
            attn_mask = torch.arange(S, device=x.device)[None, :] <= (S - L + torch.arange(L, device=x.device))[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and L > 1,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], L, -1))


class DraftMLP(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """A Llama decoder layer; layer 0 has no input norm (its input is the fc output)."""

    def __init__(self, config: DraftConfig, index: int):
        super().__init__()
        if index > 0:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.index = index

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(h) if self.index > 0 else h

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        """The second residual half: ``h + MLP(post_attention_layernorm(h))``."""
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, h, cos, sin, cache=None, cache_pos: int = 0, attn_mask=None):
        h = h + self.self_attn(self.attn_input(h), cos, sin, cache, self.index, cache_pos, attn_mask)
        return self.mlp_block(h)


# ---- the draft KV cache -------------------------------------------------------------------------------------

class DraftCache:
    """Preallocated draft K/V ``[B, Hkv, capacity, d]`` per layer.

    ``length`` counts the entries of the accepted context. Tree nodes are written after it and never counted, so
    the next write overwrites them: nothing is copied or concatenated when a round ends.
    """

    def __init__(self, config: DraftConfig, batch: int, dtype: torch.dtype, device, capacity: int = 256):
        self._shape = (batch, config.num_key_value_heads, 0, config.head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = [None] * config.num_hidden_layers
        self.capacity = 0
        self.length = 0
        self.reserve(capacity)

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` entries (grows geometrically, keeps the contents)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 64)
        B, H, _, d = self._shape
        for i, kv in enumerate(self.layers):
            # zeros: a masked slot still enters sdpa's products (a NaN there would poison its row)
            new = torch.zeros(2, B, H, cap, d, dtype=self.dtype, device=self.device)
            if kv is not None:
                new[:, :, :, :self.capacity] = kv
            self.layers[i] = new
        self.capacity = cap

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v ``[B, Hkv, n, d]`` at slots ``[pos, pos + n)``; return all keys/values ``[0, pos + n)``."""
        end = pos + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        kv = self.layers[layer]
        kv[0, :, :, pos:end] = k
        kv[1, :, :, pos:end] = v
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def select_rows(self, rows) -> None:
        """Keep batch rows ``rows`` (ascending indices), moved to the front of the same storage in place."""
        rows = list(rows)
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and not 0 <= rows[0] <= rows[-1] < self._shape[0]):
            raise ValueError(f"select_rows takes ascending row indices in [0, {self._shape[0]}), got {rows}")
        B, H, _, d = self._shape
        for i, kv in enumerate(self.layers):
            for dst, src in enumerate(rows):  # ascending, so dst <= src: a row moves before anything overwrites it
                if dst != src:
                    kv[:, dst].copy_(kv[:, src])
            self.layers[i] = kv.narrow(1, 0, len(rows))
        self._shape = (len(rows), H, 0, d)

    def compact(self, slots: torch.Tensor, starts: torch.Tensor) -> None:
        """Move each row's entries at ``slots [B, m]`` (-1 after its valid ones) to ``starts[b] ...``, all layers in
        one hass_ext.ops.compact_kv call (a batch whose rows committed different numbers of positions)."""
        compact_kv(self.layers, slots, starts)


# ---- the draft model ----------------------------------------------------------------------------------------

class DraftModel(nn.Module):
    """The EAGLE-1/2 draft head used by EAGLE-2 and HASS (see the module docstring)."""

    # On CPUs the hot-vocabulary rows of a float32 head are kept in this dtype (None: the head's own): the tree
    # streams them once per level, and bf16 halves that traffic (bench/bench_draft_vocab.py). It changes the
    # draft's proposals only by bf16 rounding; the target verifies with its own head, so outputs are unchanged.
    tree_head_dtype: Optional[torch.dtype] = torch.bfloat16

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.layers = nn.ModuleList(DraftDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # The target's lm_head weight: a reference (not a parameter or buffer), so it is never saved or copied.
        object.__setattr__(self, "_lm_head_weight", None)
        object.__setattr__(self, "_inv_freq", {})
        # The hot vocabulary (reduced draft vocabulary, FR-Spec style): sorted target ids the tree draws from, or
        # None for the full vocabulary. A non-persistent buffer: it follows .to(device) and stays out of the state
        # dict (the checkpoint keeps it in a file of its own, see hass_ext.draft_io).
        self.register_buffer("hot_token_ids", None, persistent=False)
        object.__setattr__(self, "_hot_head", (None, None, None, None))  # (head, its version, map, rows [N, H])
        # The measured acceptance of tree shapes (hass_ext.tree_choice), saved as tree_profile.json; None if never
        # measured. It belongs to these weights and this token map: changing the map drops it.
        self.tree_profile = None
        # tree expansion calls the layers with a few rows; bf16-valued weights are streamed as bf16 (cpu_linear)
        use_small_linear(self, exact_bf16=True)

    # -- the head ----------------------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> Optional[torch.Tensor]:
        return self._lm_head_weight

    def set_lm_head(self, weight: torch.Tensor) -> None:
        """Use ``weight [vocab, hidden]`` (the target's lm_head) for the draft's logits."""
        want = (self.config.vocab_size, self.config.hidden_size)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != want:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"the draft needs an lm_head weight of shape {want} (vocab, hidden); got {got}")
        object.__setattr__(self, "_lm_head_weight", weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[..., V]`` of predicted features ``[..., H]`` through the target's head."""
        if self._lm_head_weight is None:
            raise RuntimeError("the draft has no lm_head: create it with init_draft/load_draft(target=...) or call "
                               "set_lm_head(target.model.lm_head.weight)")
        w = self._lm_head_weight
        return linear(hidden.to(w.dtype), w)

    def set_token_map(self, token_ids) -> None:
        """Draft tree tokens from ``token_ids`` only (a hot vocabulary: 1-D target ids, unique, in
        ``[0, vocab_size)``; stored sorted as int64), or from the whole vocabulary with None.

        Only the tree expansion uses it (``tree_logits``); ``logits`` (training) keeps the full vocabulary. The
        target still verifies over its full vocabulary, so decoding stays lossless whatever the map.
        """
        old = self.hot_token_ids
        ids = None if token_ids is None else check_token_map(token_ids, self.config.vocab_size).to(self.device)
        same = (old is None and ids is None) or (old is not None and ids is not None and old.shape == ids.shape
                                                 and bool(torch.equal(old, ids)))
        if not same:
            self.tree_profile = None
        self.hot_token_ids = ids

    def tree_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[..., N]`` over the hot vocabulary (``[..., V]`` without a map): column j is token
        ``hot_token_ids[j]`` (see ``tree_token_ids``). The ``[N, H]`` rows of the lm_head are gathered once (in
        ``tree_head_dtype`` for a float32 head on a CPU) and kept until the head, its contents or the map change."""
        ids = self.hot_token_ids
        if ids is None:
            return self.logits(hidden)
        w = self._lm_head_weight
        if w is None:
            return self.logits(hidden)  # raises the missing-head error
        version = tensor_version(w)
        cw, cv, cids, rows = self._hot_head
        want = self.tree_head_dtype if w.device.type == "cpu" and w.dtype == torch.float32 else None
        if cw is not w or cv != version or cids is not ids or rows.dtype != (want or w.dtype):
            # new head, head updated in place, new map or new row dtype
            rows = w.detach().index_select(0, ids.to(w.device)).to(want or w.dtype)
            object.__setattr__(self, "_hot_head", (w, version, ids, rows))
        return linear(hidden.to(w.dtype), rows)  # a bf16 copy of an fp32 head: fp32 inputs, widened rows

    def tree_token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Target token ids of ``tree_logits`` columns (the identity without a map)."""
        ids = self.hot_token_ids
        return columns if ids is None else ids[columns]

    @property
    def tree_vocab_size(self) -> int:
        """How many tokens the tree can draw from: the hot vocabulary's size, or the full vocabulary."""
        ids = self.hot_token_ids
        return self.config.vocab_size if ids is None else int(ids.shape[0])

    # -- reusable pieces ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def project(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``fc(concat(embed(input_ids), features))``: the decoder layer's input ``[B, L, H]``."""
        with torch.no_grad():
            emb = self.embed_tokens(input_ids)
        return self.fc(torch.cat((emb.to(features.dtype), features), dim=-1))

    def rotary(self, position_ids: torch.Tensor):
        """RoPE ``(cos, sin)``, each ``[B, L, head_dim]`` fp32, for ``position_ids [B, L]`` (or ``[L]``)."""
        dev = position_ids.device
        inv = self._inv_freq.get(dev)
        if inv is None:
            inv = self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        freqs = pos.to(torch.float32)[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[DraftCache] = None, cache_pos: Optional[int] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted next features ``[B, L, H]`` for the pairs ``(features[:, t], input_ids[:, t])``.

        position_ids: default ``cache_pos + arange(L)``. cache: keys/values are written at ``cache_pos``
        (default ``cache.length``) and attention covers ``[0, cache_pos + L)``; ``cache.length`` is not advanced
        (the caller decides what becomes context). attn_mask: bool ``[L, cache_pos + L]`` (or ``[B, L, cache_pos + L]``), default causal.
        """
        if cache is not None and cache_pos is None:
            cache_pos = cache.length
        cache_pos = cache_pos or 0
        L = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(cache_pos, cache_pos + L, device=input_ids.device)[None]
        cos, sin = self.rotary(position_ids)
        h = self.project(input_ids, features.to(self.dtype))
        for layer in self.layers:
            h = layer(h, cos, sin, cache, cache_pos, attn_mask)
        return h

    def new_cache(self, batch: int = 1, capacity: int = 256) -> DraftCache:
        return DraftCache(self.config, batch, self.dtype, self.device, capacity)


def check_token_map(token_ids, vocab_size: Optional[int] = None) -> torch.Tensor:
    """A hot vocabulary as a sorted int64 CPU tensor; ValueError for an empty, non-1-D, non-integer,
    out-of-range or repeated one."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach()
    else:
        try:
            ids = torch.as_tensor(list(token_ids))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"token map must be a 1-D sequence of token ids, got {type(token_ids).__name__}: "
                             f"{e}") from e
    if ids.dim() != 1:
        raise ValueError(f"token map must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("token map is empty: give at least one token id (or None for the full vocabulary)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"token map must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.to("cpu", torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bound = vocab_size if vocab_size is not None else "vocab_size"
        raise ValueError(f"token map ids must be in [0, {bound}) (the vocabulary), got range [{lo}, {hi}]")
    ids = torch.sort(ids).values
    dup = ids[1:] == ids[:-1]
    if bool(dup.any()):
        raise ValueError(f"token map has repeated token ids, e.g. {int(ids[1:][dup][0])}")
    return ids


def target_parts(target):
    """(config, input embedding, lm_head weight) of a hass_ext.Target or a transformers causal LM."""
    model = target if hasattr(target, "get_output_embeddings") else getattr(target, "model", None)
    if not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"target must be a hass_ext.Target or a transformers causal LM, got {type(target).__name__}")
    return model.config, model.get_input_embeddings().weight, model.get_output_embeddings().weight


def check_draft_matches_target(config: DraftConfig, target) -> None:
    """Raise ValueError when the draft's vocabulary or hidden size differs from the target's."""
    tcfg, _, head = target_parts(target)
    tv, th = int(head.shape[0]), int(head.shape[1])
    if config.vocab_size != tv or config.hidden_size != th:
        raise ValueError(f"draft does not match the target: draft vocab_size={config.vocab_size}, "
                         f"hidden_size={config.hidden_size}; target lm_head has vocab {tv}, hidden {th} "
                         f"({getattr(tcfg, 'model_type', '?')})")


@torch.inference_mode()
def context_pass(draft: DraftModel, cache: DraftCache, features: torch.Tensor, token_ids: torch.Tensor
                 ) -> torch.Tensor:
    """The draft over newly committed positions: the pairs ``(features[i], token_ids[i])`` (the target's features
    at positions ``cache.length + i`` and the tokens that follow them) are appended to the draft cache, whose
    ``length`` advances by their number. Returns the draft's output at the last pair ``[H]``, which ranks the
    first level of the next tree.

    features: ``[m, H]``; token_ids: ``[m]`` int64 on the draft's device.
    """
    out = draft(token_ids[None], features[None].to(draft.dtype), cache=cache, cache_pos=cache.length)
    cache.length += int(token_ids.shape[0])
    return out[0, -1]


def init_draft(target, seed: int = 0, bias: bool = True, **config_overrides) -> DraftModel:
    """A randomly initialised draft for ``target`` (a ``hass_ext.Target`` or a transformers causal LM).

    Weights ~ N(0, initializer_range) (biases 0, norms 1) from ``seed`` without touching the global RNG; the
    embedding is copied from the target; the head is the target's lm_head; device and dtype are the target's.
    """
    model = getattr(target, "model", target)
    if not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"init_draft needs a hass_ext.Target or a transformers causal LM, got {type(target).__name__}")
    unknown = sorted(set(config_overrides) - {f.name for f in fields(DraftConfig)})
    if unknown:
        raise ValueError(f"init_draft: unknown draft config options {unknown}")
    config = DraftConfig.from_target(model.config, bias=bias, **config_overrides)
    check_draft_matches_target(config, model)  # the embedding is copied and the head shared: sizes must agree
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    draft = DraftModel(config)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * config.initializer_range)
        draft.embed_tokens.weight.copy_(emb.detach().float())
    draft = draft.to(device=head.device, dtype=head.dtype)
    draft.set_lm_head(head)
    return draft.eval()
