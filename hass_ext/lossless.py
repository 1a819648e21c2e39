"""Checking that speculative decoding is lossless for a given target: ``check_lossless``.

Greedy speculative output equals the target's own greedy decoding bit for bit when every op of the target's decode
path gives a row a result that does not depend on the rows computed with it: hass_ext routes the linear layers
through ``small_linear`` and the attention through the tree-attention kernel (a vanilla decode step runs as a
one-node tree), and norms, RoPE, activations and embeddings are per-row by construction. A model class whose layers
are not routed (a custom linear module, an attention that ignores transformers' attention interface) can break
that; ``check_lossless`` says which layers are not routed and compares the outputs on a few prompts.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from .generate import generate
from .hf_attention import ATTN_IMPLEMENTATION
from .ops.small_linear import SmallLinear
from .target import resolve_target


@dataclass
class LosslessReport:
    row_invariant: bool            # every linear layer is a SmallLinear and the attention is hass_tree
    unrouted: List[str]            # what is not routed through the row-invariant kernels
    prompts: int = 0
    identical: int = 0
    divergences: List[dict] = field(default_factory=list)  # {"prompt": i, "index": first differing token}

    @property
    def ok(self) -> bool:
        return self.row_invariant and self.identical == self.prompts

    def __str__(self) -> str:
        head = (f"{self.identical}/{self.prompts} prompts token-identical; "
                + ("row-invariant kernels on the whole decode path" if self.row_invariant
                   else "not row-invariant: " + "; ".join(self.unrouted)))
        return head + "".join(f"\n  prompt {d['prompt']}: first difference at token {d['index']}"
                              for d in self.divergences)


def unrouted_layers(target) -> List[str]:
    """The parts of ``target``'s decode path that do not run on the row-invariant kernels (empty: all do)."""
    model = target.model
    out = []
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        out.append(f"attention is {impl!r}, not {ATTN_IMPLEMENTATION!r} (load_target's CPU default)")
    plain = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not SmallLinear]
    if plain:
        out.append(f"{len(plain)} linear layers are not SmallLinear (hass_ext.use_small_linear), e.g. {plain[0]}")
    return out


def check_lossless(prompts: Sequence, target=None, draft="default", max_new_tokens: int = 32,
                   **tree_options) -> LosslessReport:
    """Greedy-decode each prompt with and without the draft and compare the tokens.

    prompts: strings, chat message lists or token ids, as ``generate`` takes them. target / draft / tree_options:
    as for ``generate``. Returns a LosslessReport (``report.ok``; ``print(report)`` explains).
    """
    if isinstance(prompts, (str, torch.Tensor)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings, message lists or token ids)")
    target = resolve_target(target)
    unrouted = unrouted_layers(target)
    report = LosslessReport(row_invariant=not unrouted, unrouted=unrouted)
    for i, prompt in enumerate(prompts):
        vanilla = generate(prompt, target=target, max_new_tokens=max_new_tokens).token_ids
        spec = generate(prompt, target=target, draft=draft, max_new_tokens=max_new_tokens, **tree_options).token_ids
        report.prompts += 1
        if spec == vanilla:
            report.identical += 1
        else:
            index = next((j for j, (a, b) in enumerate(zip(vanilla, spec)) if a != b), min(len(vanilla), len(spec)))
            report.divergences.append({"prompt": i, "index": index})
    return report
