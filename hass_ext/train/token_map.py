"""Hot vocabularies for the draft (FR-Spec style): count the assistant tokens of prepared data, keep the N most
frequent plus the tokens that end or frame a turn.

The draft then drafts from those N tokens only (``DraftModel.set_token_map``), so each tree expansion multiplies
by N rows of the lm_head instead of the whole vocabulary. Decoding stays lossless: the target verifies with its
full vocabulary.
"""
import os
from typing import Iterable, Optional

import torch

from .shards import Shard, read_manifest


def token_frequencies(data_dir: str, vocab_size: Optional[int] = None) -> torch.Tensor:
    """How often each token id occurs where ``loss_mask`` is 1 (assistant tokens) in a prepare-data folder.

    Returns int64 counts ``[vocab_size]`` (default: the manifest's ``vocab_size``, else the largest id + 1).
    Reads only the token ids and masks of every shard listed in the manifest (checksums are not verified).
    """
    manifest = read_manifest(data_dir)
    if vocab_size is None and manifest.get("vocab_size") is not None:
        vocab_size = int(manifest["vocab_size"])
    counts = torch.zeros(vocab_size or 0, dtype=torch.int64)
    for entry in manifest["shards"]:
        shard = Shard(os.path.join(data_dir, entry["file"]), expected=entry,
                      hidden_size=manifest.get("hidden_size"), verify_checksum=False)
        ids, mask = shard.token_arrays()
        ids = ids[mask.bool()].to(torch.int64)
        if ids.numel() == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise ValueError(f"{shard.path}: token ids range over [{lo}, {hi}], outside the vocabulary "
                             f"[0, {vocab_size})")
        c = torch.bincount(ids, minlength=counts.numel())
        if c.numel() > counts.numel():  # no vocab size known: grow with the largest id seen
            c[: counts.numel()] += counts
            counts = c
        else:
            counts += c
    return counts


def hot_vocabulary(counts: torch.Tensor, n: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``n`` token ids to draft from: every id of ``always`` (end-of-turn, chat-template tokens), then the most
    frequent others (ties: lower id first). Returns them sorted, int64 ``[n]``."""
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.is_floating_point() or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D integer tensor, got shape {tuple(counts.shape)} "
                         f"{counts.dtype}")
    V = counts.numel()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= V:
        raise ValueError(f"hot vocabulary size must be an int in [1, {V}] (the vocabulary), got {n!r}")
    forced = sorted({int(t) for t in always})
    if forced and (forced[0] < 0 or forced[-1] >= V):
        raise ValueError(f"always-kept token ids must be in [0, {V}), got {forced}")
    if len(forced) > n:
        raise ValueError(f"hot vocabulary size {n} cannot hold the {len(forced)} always-kept tokens")
    key = counts.to(torch.int64).clone()
    if forced:
        key[forced] = -1  # taken anyway: rank the others
    # stable sort by descending count keeps the lower id first among equal counts
    order = torch.sort(key, descending=True, stable=True).indices
    rest = order[: n - len(forced)]
    return torch.sort(torch.cat([torch.tensor(forced, dtype=torch.int64), rest])).values


def template_token_ids(target) -> list:
    """Tokens a hot vocabulary must keep for ``target``: its EOS / end-of-turn ids and the special tokens its chat
    template puts around a turn (found by rendering a short conversation)."""
    tok = target.tokenizer
    ids = set(int(i) for i in target.eos_token_ids)
    special = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    if getattr(tok, "chat_template", None):
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}]
        try:
            rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        except Exception:  # a template without a system role
            rendered = tok.apply_chat_template(messages[1:], tokenize=True, return_dict=True)["input_ids"]
        ids.update(int(t) for t in rendered if int(t) in special)
    vocab = int(target.config.vocab_size)
    return sorted(t for t in ids if 0 <= t < vocab)
