"""Harmonized context alignment (HCA): the draft's multi-stream training forward.

At decode time draft step F (F = 1, 2, ...) after a verified prefix sees true target features up to the prefix
end and then its own F-1 earlier predictions. Training reproduces this for every position at once: step F runs
the draft over F feature streams that share the teacher-forced tokens,

    stream 0:  f_c (the target's features, noised in training)           -> keys/values "T"
    stream i:  level i = the step-i predictions shifted right by one     -> keys/values "D_i"   (i = 1..F-1)
               (column c holds the step-i estimate of f_c; column 0 holds f_0)

and the query of row r comes from the last stream. Row r attends T at columns c <= r-(F-1) and, for each
i = 1..F-1, the single D_i key at column c = r-(F-1)+i (table for L=6, J=3):

    step 1 (F=1)       step 2 (F=2)           step 3 (F=3)
    q0: T . . . . .    q0: D1 .  .  .  .  .   q0: D2 .  .  .  .  .
    q1: T T . . . .    q1: T  D1 .  .  .  .   q1: D1 D2 .  .  .  .
    q2: T T T . . .    q2: T  T  D1 .  .  .   q2: T  D1 D2 .  .  .
    q3: T T T T . .    q3: T  T  T  D1 .  .   q3: T  T  D1 D2 .  .
    q4: T T T T T .    q4: T  T  T  T  D1 .   q4: T  T  T  D1 D2 .
    q5: T T T T T T    q5: T  T  T  T  T  D1  q5: T  T  T  T  D1 D2

The attention itself is the ``align_attention`` kernel: a proper masked softmax (``attention="proper"``, the
default) or the reference code's leaky normalisation (``"reference"``). Step 1 equals the
inference forward of the draft.
"""
from typing import List, Optional, Sequence

import torch

from ..draft import apply_rotary
from ..ops import align_attention

ATTENTION_MODES = ("proper", "reference")


def align_forward(draft, input_ids: torch.Tensor, features: torch.Tensor, levels: Sequence[torch.Tensor] = (),
                  position_ids: Optional[torch.Tensor] = None, attention: str = "proper") -> torch.Tensor:
    """Draft step ``F = len(levels) + 1``: predicted next features ``[B, L, H]``.

    input_ids ``[B, L]``: the tokens x_{c+1} paired with column c. features ``[B, L, H]``: target features f_c.
    levels: the F-1 earlier levels (``next_level``), each ``[B, L, H]``, detached.
    position_ids: ``[B, L]`` or ``[L]``, default ``arange(L)``.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if len(draft.layers) != 1:
        raise ValueError(f"harmonized context alignment trains one-layer drafts, got {len(draft.layers)} layers")
    B, L, H = features.shape
    for i, lv in enumerate(levels):
        if lv.shape != features.shape:
            raise ValueError(f"levels[{i}] has shape {tuple(lv.shape)}, expected {tuple(features.shape)}")
    F = len(levels) + 1
    layer = draft.layers[0]
    attn = layer.self_attn
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if position_ids is None:
        position_ids = torch.arange(L, device=features.device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(B, L)
    cos, sin = draft.rotary(position_ids)  # [B, L, d] fp32

    # All streams through fc and the k/v projections in one batch: [F*B, L, H].
    streams = torch.cat([features, *levels], dim=0)
    a = draft.project(input_ids.repeat(F, 1), streams)
    x = layer.attn_input(a[(F - 1) * B:])  # the query stream (the last one); identity for layer 0
    q = apply_rotary(attn.q_proj(x).view(B, L, nh, d).transpose(1, 2), cos, sin)
    k = attn.k_proj(a).view(F * B, L, nkv, d).transpose(1, 2)
    k = apply_rotary(k, cos.repeat(F, 1, 1), sin.repeat(F, 1, 1)).reshape(F, B, nkv, L, d)
    v = attn.v_proj(a).view(F * B, L, nkv, d).transpose(1, 2).reshape(F, B, nkv, L, d)
    o = align_attention(q, k, v, d ** -0.5, semantics=attention)
    h = x + attn.o_proj(o.transpose(1, 2).reshape(B, L, nh * d))
    return layer.mlp_block(h)


def next_level(base: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The level built from a step's predictions: ``[base[:, :1], pred[:, :-1]]``, detached.

    ``pred[:, c-1]`` predicts f_c, so after the shift column c holds an estimate of f_c; column 0 keeps f_0
    (``base`` is the noised target features for step 1 and the previous level afterwards).
    """
    return torch.cat((base[:, :1], pred[:, :-1].to(base.dtype)), dim=1).detach()


def alignment_steps(draft, input_ids, features, num_steps: int, position_ids=None, attention: str = "proper"):
    """Yield the predictions of steps 1..num_steps; levels are built from the previous steps' outputs."""
    levels: List[torch.Tensor] = []
    for j in range(num_steps):
        pred = align_forward(draft, input_ids, features, levels, position_ids, attention)
        yield pred
        if j + 1 < num_steps:
            levels.append(next_level(features if j == 0 else levels[-1], pred))
