"""On-disk training data: safetensors shards plus a manifest, and the reader the trainer uses.

A data folder holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files. Each shard packs its examples back
to back (``offsets`` delimit them):

| tensor          | dtype       | shape        | meaning                                                     |
|-----------------|-------------|--------------|-------------------------------------------------------------|
| input_ids       | int32       | [T]          | tokens of the rendered conversations                        |
| hidden_states   | bf16 (fp16) | [T, H]       | the target's final-norm hidden state at every token (f_t)   |
| loss_mask       | uint8       | [T]          | 1 where the token belongs to an assistant message           |
| offsets         | int64       | [n + 1]      | example i is rows offsets[i]:offsets[i+1]                   |
| source_index    | int64       | [n]          | index of the example's conversation in the source           |

Mask convention stored on disk ("token"): ``loss_mask[t]`` describes token ``t`` itself. How the trainer aligns it
with its predictions is documented in trainer.py.

Every file is written to a temporary name and renamed into place; the manifest lists each shard with its sha256,
so a damaged or foreign file is reported by name instead of being trained on.
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..atomic_io import atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported)

MANIFEST = "manifest.json"
FORMAT = "hass-ext-shards-v1"
MASK_CONVENTION = ("token: loss_mask[t] = 1 iff input_ids[t] belongs to an assistant message as rendered by the "
                   "chat template (its content and end-of-turn marker)")
_KEYS = ("input_ids", "hidden_states", "loss_mask", "offsets", "source_index")


class CorruptShardError(ValueError):
    """A shard or manifest that cannot be read or does not match the manifest."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pack_examples(examples: Sequence[tuple], hidden_size: int, hidden_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Shard tensors from ``(source_index, input_ids [L], hidden [L, H], loss_mask [L])`` tuples."""
    lengths = [len(e[1]) for e in examples]
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    if examples:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return {
        "input_ids": torch.cat([torch.as_tensor(e[1], dtype=torch.int32) for e in examples]) if examples
        else torch.zeros(0, dtype=torch.int32),
        "hidden_states": torch.cat([e[2].to(hidden_dtype) for e in examples]) if examples
        else torch.zeros(0, hidden_size, dtype=hidden_dtype),
        "loss_mask": torch.cat([torch.as_tensor(e[3], dtype=torch.uint8) for e in examples]) if examples
        else torch.zeros(0, dtype=torch.uint8),
        "offsets": offsets,
        "source_index": torch.tensor([int(e[0]) for e in examples], dtype=torch.int64),
    }


def write_shard(path: str, tensors: Dict[str, torch.Tensor]) -> str:
    """Atomically write one shard; returns its sha256."""

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a prepared data folder (run prepare-data)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptShardError(f"corrupt manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("shards"), list):
        raise CorruptShardError(f"corrupt manifest {path}: expected format {FORMAT!r} with a 'shards' list")
    return manifest


class Shard:
    """One shard file opened for reading; validates its layout on open and reads examples lazily."""

    def __init__(self, path: str, expected: Optional[dict] = None, hidden_size: Optional[int] = None,
                 verify_checksum: bool = True):

        self.path = path
        if not os.path.exists(path):
            raise CorruptShardError(f"missing shard {path}")
        if expected is not None and verify_checksum and expected.get("sha256"):
            digest = sha256_file(path)
            if digest != expected["sha256"]:
                raise CorruptShardError(f"corrupt shard {path}: sha256 {digest[:12]}... does not match the "
                                        f"manifest ({expected['sha256'][:12]}...)")
        try:
            self._file = safe_open(path, framework="pt")
            keys = set(self._file.keys())
            missing = [k for k in _KEYS if k not in keys]
            if missing:
                raise CorruptShardError(f"corrupt shard {path}: missing tensors {missing}")
            self.offsets = self._file.get_tensor("offsets")
            self.source_index = self._file.get_tensor("source_index")
            ids_shape = self._file.get_slice("input_ids").get_shape()
            hid_shape = self._file.get_slice("hidden_states").get_shape()
            mask_shape = self._file.get_slice("loss_mask").get_shape()
        except CorruptShardError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged headers/data
            raise CorruptShardError(f"corrupt shard {path}: {e}") from e
        n = self.offsets.numel() - 1
        T = ids_shape[0] if len(ids_shape) == 1 else -1
        problems = []
        if n < 0 or self.offsets[0] != 0 or (n > 0 and bool((self.offsets[1:] < self.offsets[:-1]).any())):
            problems.append("offsets are not a non-decreasing list starting at 0")
        elif int(self.offsets[-1]) != T:
            problems.append(f"offsets end at {int(self.offsets[-1])} but input_ids has shape {ids_shape}")
        if len(hid_shape) != 2 or hid_shape[0] != T:
            problems.append(f"hidden_states has shape {hid_shape}, expected [{T}, H]")
        elif hidden_size is not None and hid_shape[1] != hidden_size:
            problems.append(f"hidden_states has width {hid_shape[1]}, the manifest says {hidden_size}")
        if list(mask_shape) != [T]:
            problems.append(f"loss_mask has shape {mask_shape}, expected [{T}]")
        if self.source_index.shape != (max(n, 0),):
            problems.append(f"source_index has shape {tuple(self.source_index.shape)}, expected [{n}]")
        if expected is not None and expected.get("examples") is not None and expected["examples"] != n:
            problems.append(f"holds {n} examples, the manifest says {expected['examples']}")
        if problems:
            raise CorruptShardError(f"corrupt shard {path}: " + "; ".join(problems))
        self.num_examples = n

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def token_arrays(self):
        """``(input_ids [T] int32, loss_mask [T] uint8)`` of the whole shard (no hidden states read)."""
        try:
            return self._file.get_tensor("input_ids"), self._file.get_tensor("loss_mask")
        except Exception as e:
            raise CorruptShardError(f"corrupt shard {self.path}: cannot read input_ids/loss_mask: {e}") from e

    def example(self, i: int) -> Dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        try:
            return {
                "input_ids": self._file.get_slice("input_ids")[a:b].to(torch.long),
                "hidden_states": self._file.get_slice("hidden_states")[a:b],
                "loss_mask": self._file.get_slice("loss_mask")[a:b],
            }
        except Exception as e:
            raise CorruptShardError(f"corrupt shard {self.path}: cannot read example {i}: {e}") from e


def is_held_out(index: int, eval_fraction: float) -> bool:
    """Deterministic split by global example index: every ~1/eval_fraction-th example is held out."""
    return eval_fraction > 0 and int((index + 1) * eval_fraction) > int(index * eval_fraction)


class ShardDataset:
    """The examples of a prepared data folder, in a fixed order: shards in manifest order, examples in shard order.

    split: "train" (default), "eval" (held-out, ``eval_fraction`` of the examples, spread evenly by index) or
        "all". Indexing returns ``{"input_ids" [L] int64, "hidden_states" [L, H], "loss_mask" [L] uint8}``.
    """

    def __init__(self, folder: str, split: str = "train", eval_fraction: float = 0.05, verify_checksum: bool = True):
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.hidden_size = int(self.manifest["hidden_size"])
        self.shards: List[Shard] = [
            Shard(os.path.join(folder, s["file"]), expected=s, hidden_size=self.hidden_size,
                  verify_checksum=verify_checksum)
            for s in self.manifest["shards"]]
        self._index = []  # (shard, example) of the examples in this split
        g = 0
        for si, sh in enumerate(self.shards):
            for ei in range(sh.num_examples):
                held = is_held_out(g, eval_fraction)
                if split == "all" or held == (split == "eval"):
                    self._index.append((si, ei))
                g += 1
        self._lengths = None

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        si, ei = self._index[i]
        return self.shards[si].example(ei)

    def lengths(self) -> List[int]:
        if self._lengths is None:
            per = [sh.lengths() for sh in self.shards]
            self._lengths = [int(per[si][ei]) for si, ei in self._index]
        return self._lengths


def collate(examples: Sequence[Dict[str, torch.Tensor]], max_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch (zeros; ``attention_mask`` marks the real tokens).

    Returns input_ids [B, L] int64, hidden_states [B, L, H] float32, loss_mask [B, L] float32,
    attention_mask [B, L] bool. ``max_len`` truncates longer examples.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lens = [min(len(e["input_ids"]), max_len) if max_len else len(e["input_ids"]) for e in examples]
    B, L, H = len(examples), max(lens), examples[0]["hidden_states"].shape[-1]
    ids = torch.zeros(B, L, dtype=torch.long)
    hid = torch.zeros(B, L, H, dtype=torch.float32)
    mask = torch.zeros(B, L, dtype=torch.float32)
    att = torch.zeros(B, L, dtype=torch.bool)
    for b, (e, n) in enumerate(zip(examples, lens)):
        ids[b, :n] = e["input_ids"][:n]
        hid[b, :n] = e["hidden_states"][:n].float()
        mask[b, :n] = e["loss_mask"][:n].float()
        att[b, :n] = True
    return {"input_ids": ids, "hidden_states": hid, "loss_mask": mask, "attention_mask": att}
