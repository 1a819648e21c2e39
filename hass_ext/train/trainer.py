"""The draft trainer: HASS (harmonized context alignment + top-K distillation) or the EAGLE baseline.

One optimizer step:

    pairs = shift(batch)                          (f_t, x_{t+1}) -> f_{t+1}; loss mask per loss.py
    f~    = f + uniform noise                     train split only; amplitude std * 512 / n (reference) or std
    for j in 1..J:                                J = align_steps (HASS 3, EAGLE 1)
        pred_j = draft step j over [f~, levels]   align.py; levels = detached shifted earlier predictions
        loss  += step_weights[j] * (v_w * SmoothL1 + p_w * CE + topk_w * TopK-CE)    (loss.py)
        backward per step (same gradient as one backward of the sum, less memory)
    clip_grad_value(0.5); AdamW(β 0.9, 0.95, wd 0.01); linear warmup + linear decay

``mode="eagle"`` is J = 1 and topk_w = 0 on the same data, seed and step budget.

Determinism: the order of examples is a function of (seed, epoch) and the step number alone, the noise of a step
comes from a generator seeded by (seed, step, rank), so a run resumed from a checkpoint continues bit for bit.
Checkpoints (``out_dir/checkpoints/step-N``) hold the draft in the EAGLE layout (``draft/``), the optimizer,
scheduler and RNG states; each is built in a temporary folder and renamed into place, then ``latest.json`` is
replaced, so an interruption never leaves a half-written checkpoint behind (a temporary folder left by a killed
write is removed when the next run starts). A checkpoint is written every ``save_every`` steps, at the end, and
when the run is stopped by SIGINT (Ctrl-C) or SIGTERM: the step in progress finishes, the checkpoint is written and
``train`` raises TrainingInterrupted, whose message says how to continue. ``train(resume=True)`` continues from
the latest checkpoint (bit for bit) and refuses when there is none; a folder that already holds a run is refused
without it.

Resuming with another ``max_steps`` (or ``epochs``) is allowed: the learning rate then follows the schedule of
the new length (warmup, then linear decay to zero at the new last step) from the step reached, as if the run had
been started with it; the steps already taken keep the learning rates they had.

Multi-process data parallelism: run under ``torchrun``; each process takes its slice of every global batch and
PyTorch DDP averages the gradients (nccl on GPUs, gloo on CPUs). bf16 autocast is used on CUDA by default (and on
CPUs with ``autocast="bf16"``); master weights and optimizer state stay fp32.
"""
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..draft import init_draft
from ..draft_io import load_draft, save_draft
from ..target import Target, resolve_target
from .align import ATTENTION_MODES, align_forward, next_level
from .heldout import evaluate_batch, merge_counts, summarize
from .loss import MASK_ALIGNMENTS, step_loss, target_stats, training_pairs, uniform_noise
from .shards import ShardDataset, atomic_write_bytes, atomic_write_json, collate
from .token_map import hot_vocabulary, template_token_ids, token_frequencies

MODES = ("hass", "eagle")
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
DRAFT_DIR = "draft"
DEFAULT_SAVE_EVERY = 200
_STOP_SIGNALS = ("SIGINT", "SIGTERM")


class TrainingInterrupted(Exception):
    """``train`` was stopped by a signal after writing a checkpoint; the message says how to continue."""

    def __init__(self, message: str, signal_name: str, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with every checkpoint)."""
    data_dir: str
    out_dir: str
    mode: str = "hass"
    align_steps: Optional[int] = None          # J: default 3 (hass), 1 (eagle)
    topk: int = 10                             # K of the top-K loss
    topk_w: Optional[float] = None             # default 1.0 (hass), 0.0 (eagle)
    v_w: float = 1.0                           # feature regression (SmoothL1)
    p_w: float = 0.1                           # soft cross-entropy
    step_weights: Optional[List[float]] = None  # per alignment step, default all 1
    lr: float = 3e-5
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    clip_value: float = 0.5                    # clip_grad_value_
    warmup_ratio: float = 0.01                 # of the total steps, unless warmup_steps is given
    warmup_steps: Optional[int] = None
    batch_size: int = 2                        # examples per process per step
    epochs: int = 1
    max_steps: Optional[int] = None            # default: epochs * steps per epoch
    max_len: Optional[int] = None              # truncate examples (default: as prepared)
    noise_std: float = 0.2
    noise_scale_by_length: bool = True         # reference: amplitude std * 512 / n; False: std
    mask_alignment: str = "predicted"          # see loss.py
    attention: str = "proper"                  # "reference" = the reference code's leaky softmax
    autocast: str = "auto"                     # "auto": bf16 on CUDA, fp32 on CPU; "bf16": bf16 on any device
                                               # (fast on CPUs with AMX/avx512_bf16); "off": fp32
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int = 0                        # steps; 0 = only at the end
    eval_k: int = 5                            # chain length of the k-step acceptance
    eval_max_examples: Optional[int] = None
    save_every: int = DEFAULT_SAVE_EVERY       # steps; 0 = only at the end and when stopped by a signal
    keep_checkpoints: int = 2
    log_every: int = 10
    draft_vocab: Optional[int] = None          # distil over the N most frequent assistant tokens of the data only
                                               # (the draft's hot vocabulary, saved as its token map); None: all
    init_from: Optional[str] = None            # start from a saved draft (EAGLE layout folder)
    bias: bool = True                          # fc bias of a new draft (the reference trains with one)
    verify_checksum: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.align_steps is None:
            self.align_steps = 3 if self.mode == "hass" else 1
        if self.topk_w is None:
            self.topk_w = 1.0 if self.mode == "hass" else 0.0
        if self.mode == "eagle" and (self.align_steps != 1 or self.topk_w != 0):
            raise ValueError(f"mode='eagle' is align_steps=1, topk_w=0; got align_steps={self.align_steps}, "
                             f"topk_w={self.topk_w} (use mode='hass' for other settings)")
        if self.align_steps < 1:
            raise ValueError(f"align_steps must be >= 1, got {self.align_steps}")
        if self.step_weights is None:
            self.step_weights = [1.0] * self.align_steps
        self.step_weights = [float(w) for w in self.step_weights]
        if len(self.step_weights) != self.align_steps:
            raise ValueError(f"step_weights needs {self.align_steps} values (one per alignment step), "
                             f"got {self.step_weights}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.mask_alignment not in MASK_ALIGNMENTS:
            raise ValueError(f"mask_alignment must be one of {MASK_ALIGNMENTS}, got {self.mask_alignment!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        for name in ("batch_size", "epochs", "topk", "eval_k", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = only at the end), got {getattr(self, name)}")
        if self.eval_max_examples is not None and self.eval_max_examples < 0:
            raise ValueError(f"eval_max_examples must be >= 0 or None, got {self.eval_max_examples}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.draft_vocab is not None and (isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int)
                                             or self.draft_vocab < self.topk):
            raise ValueError(f"draft_vocab must be an int >= topk ({self.topk}) or None, got {self.draft_vocab!r}")


# Settings a resumed run may change: they do not affect the weights of the steps already taken (max_steps and
# epochs only change where the run ends and the learning-rate schedule from the resumed step on).
_RESUME_FREE = {"out_dir", "data_dir", "eval_every", "eval_max_examples", "save_every", "keep_checkpoints",
                "log_every", "verify_checksum", "progress", "init_from", "max_steps", "epochs"}


class _AlignStep(nn.Module):
    """The alignment forward as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, draft):
        super().__init__()
        self.draft = draft

    def forward(self, input_ids, features, levels, attention: str):
        return align_forward(self.draft, input_ids, features, levels, attention=attention)


def _linear_warmup_decay(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _rng_state() -> dict:
    """The global RNG states as plain Python values (they travel through all_gather_object and torch.load)."""

    st = np.random.get_state()
    cuda = [bytes(t.numpy()) for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": bytes(torch.get_rng_state().numpy()), "cuda": cuda, "python": random.getstate(),
            "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}


def _set_rng_state(state: dict) -> None:

    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(b) for b in state["cuda"]])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


class Trainer:
    """Trains a draft for a target on a prepared data folder (see TrainConfig and the module docstring).

    target: the hass_ext.Target the data was prepared with (or its name/path; None loads the manifest's target).
        Only its embedding (copied into a new draft), lm_head (frozen, shared) and config are used.
    """

    def __init__(self, config: TrainConfig, target=None):

        self.config = c = config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

        self.train_set = ShardDataset(c.data_dir, "train", c.eval_fraction, c.verify_checksum)
        self.eval_set = ShardDataset(c.data_dir, "eval", c.eval_fraction, verify_checksum=False)
        manifest = self.train_set.manifest
        if not manifest.get("complete", False):
            raise ValueError(f"data preparation in {c.data_dir} is not finished ({len(manifest['shards'])} shards so "
                             "far): run prepare-data again with the same settings to complete it")
        self.data_fingerprint = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        self.global_batch = c.batch_size * self.world_size
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{c.data_dir} has {len(self.train_set)} training examples, fewer than one global batch "
                             f"({c.batch_size} x {self.world_size} processes)")
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        self.warmup_steps = c.warmup_steps if c.warmup_steps is not None else int(self.total_steps * c.warmup_ratio)

        target = self._resolve_target(target, manifest)
        # the target's head, frozen, fp32 (autocast runs its GEMMs in bf16 where enabled); shared with the draft
        self.lm_head_weight = target.model.get_output_embeddings().weight.detach().to(self.device, torch.float32)
        self.draft = self._make_draft(target)
        # The head the losses and the acceptance eval use. With draft_vocab (EAGLE-3 style) both distributions are
        # the softmax over the hot rows only: the draft learns to rank exactly the tokens its trees propose from,
        # at N / V of the head's cost. The hot vocabulary becomes the draft's token map (saved with it).
        self.loss_head = self.lm_head_weight
        if c.draft_vocab is not None:

            vocab = int(target.config.vocab_size)
            if c.draft_vocab > vocab:
                raise ValueError(f"draft_vocab ({c.draft_vocab}) is larger than the vocabulary ({vocab})")
            ids = hot_vocabulary(token_frequencies(c.data_dir, vocab), c.draft_vocab, template_token_ids(target))
            self.draft.set_token_map(ids)
            self.loss_head = self.lm_head_weight.index_select(0, ids.to(self.device)).contiguous()
        self.target_name = target.name
        del target

        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.adam_eps,
                                           weight_decay=c.weight_decay)
        self._lr_factor = _linear_warmup_decay(self.warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        module = _AlignStep(self.draft)
        if self.distributed:

            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = module
        self.step = 0
        self._perm_epoch, self._perm = None, None
        self.history: List[dict] = []
        self._window: List[float] = []      # losses since the last log record (saved with checkpoints)
        self._saved_step: Optional[int] = None
        self._stop_signal: Optional[str] = None

    # ---- setup ---------------------------------------------------------------------------------------------

    def _resolve_target(self, target, manifest):
        if not isinstance(target, Target):  # a name (by default the data's target), loaded in float32 on the CPU
            target = resolve_target(manifest["target"] if target is None else target, dtype=torch.float32,
                                    device="cpu")
        h, v = int(target.config.hidden_size), int(target.config.vocab_size)
        if (h, v) != (manifest["hidden_size"], manifest["vocab_size"]):
            raise ValueError(f"the target {target.name} (hidden {h}, vocab {v}) does not match the data in "
                             f"{self.config.data_dir} (prepared with {manifest['target']}: hidden "
                             f"{manifest['hidden_size']}, vocab {manifest['vocab_size']})")
        return target

    def _make_draft(self, target):

        c = self.config
        if c.init_from:

            draft = load_draft(c.init_from, target=target, dtype=torch.float32, device="cpu")
        else:
            draft = init_draft(target, seed=c.seed, bias=c.bias)
        draft = draft.to(device=self.device, dtype=torch.float32)
        draft.set_lm_head(self.lm_head_weight)
        return draft.train()

    # ---- data ----------------------------------------------------------------------------------------------

    def _indices(self, step: int) -> List[int]:
        """This process's examples for a global step: a (seed, epoch) permutation, sliced by step and rank."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.train_set), generator=g), epoch
        start = b * self.global_batch + self.rank * self.config.batch_size
        return self._perm[start:start + self.config.batch_size].tolist()

    def _pairs(self, examples) -> Dict[str, torch.Tensor]:
        pairs = training_pairs(collate(examples, self.config.max_len), self.config.mask_alignment)
        return {k: v.to(self.device) for k, v in pairs.items()}

    # ---- one optimizer step ----------------------------------------------------------------------------------

    def _autocast(self):
        mode = self.config.autocast
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        c = self.config
        pairs = self._pairs([self.train_set[i] for i in self._indices(self.step)])
        features = pairs["features"]
        if c.noise_std > 0:
            g = torch.Generator().manual_seed((c.seed * 1_000_003 + self.step) * 4099 + self.rank)
            features = uniform_noise(features, pairs["lengths"], c.noise_std, c.noise_scale_by_length, g)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            stats = target_stats(pairs["target"], pairs["loss_mask"], self.loss_head, c.topk)
        levels, parts = [], []
        for j in range(c.align_steps):
            sync = not self.distributed or j == c.align_steps - 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                with self._autocast():
                    pred = self.model(pairs["input_ids"], features, levels, c.attention)
                    loss, part = step_loss(pred, pairs["target"], pairs["loss_mask"], self.loss_head,
                                           c.topk, c.v_w, c.p_w, c.topk_w, stats)
                (loss * c.step_weights[j]).backward()
            part["loss"] = float(loss.detach())
            parts.append(part)
            if j + 1 < c.align_steps:
                levels.append(next_level(features if j == 0 else levels[-1], pred))
        params = [p for p in self.draft.parameters() if p.requires_grad]
        grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        torch.nn.utils.clip_grad_value_(params, c.clip_value)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "lr": lr, "loss": sum(p["loss"] for p in parts) / len(parts),
                "steps": parts, "grad_norm": grad_norm}

    # ---- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """k-step acceptance and per-step losses on the held-out examples (all processes share the work), with the
        proper attention normalisation also for drafts trained with the reference code's leaky one.

        With no held-out example (tiny data, a small eval_fraction or eval_max_examples 0) nothing is measured:
        ``acc``, ``accepted_per_chain`` and ``loss_per_step`` are None and ``note`` says why.
        """
        c = self.config
        n = len(self.eval_set) if c.eval_max_examples is None else min(len(self.eval_set), c.eval_max_examples)
        if n == 0:
            return {"examples": 0, "acc": None, "accepted_per_chain": None, "loss_per_step": None, "chains": 0,
                    "tokens": 0, "note": f"no held-out examples: {len(self.eval_set)} of the "
                                         f"{len(self.eval_set) + len(self.train_set)} examples of {c.data_dir} are "
                                         f"held out (eval_fraction {c.eval_fraction}, eval_max_examples "
                                         f"{c.eval_max_examples}), so nothing was measured"}
        mine = list(range(self.rank, n, self.world_size))
        counts = {}
        was_training = self.draft.training
        self.draft.eval()
        with self._autocast():
            for a in range(0, len(mine), c.batch_size):
                pairs = self._pairs([self.eval_set[i] for i in mine[a:a + c.batch_size]])
                # always the proper attention: decoding normalises properly, whatever the training mode
                counts = merge_counts(counts, evaluate_batch(
                    self.draft, self.loss_head, pairs, c.eval_k, c.align_steps, "proper", c.topk,
                    (c.v_w, c.p_w, c.topk_w), target_head=self.lm_head_weight,
                    vocab_ids=self.draft.hot_token_ids if c.draft_vocab is not None else None))
        self.draft.train(was_training)
        if not counts:  # this process had no share of the examples
            counts = {"correct": [0] * c.eval_k, "total": [0] * c.eval_k, "loss": [0.0] * c.align_steps,
                      "tokens": [0] * c.align_steps}
        if self.distributed:

            for key in counts:
                t = torch.tensor(counts[key], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                counts[key] = t.tolist()
        return {"examples": n, **summarize(counts)}

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _ckpt_root(self) -> str:
        return os.path.join(self.config.out_dir, CHECKPOINTS)

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoints/step-N`` atomically (rank 0) and point latest.json at it."""
        rngs = [_rng_state()]
        if self.distributed:

            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, _rng_state())
        path = None
        if self.rank == 0:

            root = self._ckpt_root()
            os.makedirs(root, exist_ok=True)
            name = f"step-{self.step:08d}"
            path = os.path.join(root, name)
            tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=root)
            try:
                save_draft(self.draft, os.path.join(tmp, "draft"))
                torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), "rng": rngs,
                            "config": asdict(self.config), "world_size": self.world_size,
                            "target": self.target_name, "data": self.data_fingerprint, "history": self.history,
                            "window": self._window, "total_steps": self.total_steps},
                           os.path.join(tmp, STATE_FILE))
                if os.path.exists(path):  # this step was saved before (by a run resumed from an earlier step)
                    stale = tempfile.mkdtemp(prefix=f".{name}.old.", dir=root)
                    os.replace(path, os.path.join(stale, name))
                os.replace(tmp, path)
            finally:
                for leftover in [tmp] + [os.path.join(root, d) for d in os.listdir(root)
                                         if d.startswith(f".{name}.old.")]:
                    if os.path.exists(leftover):
                        shutil.rmtree(leftover, ignore_errors=True)
            atomic_write_json(os.path.join(root, LATEST), {"step": self.step, "checkpoint": name})
            kept = sorted(d for d in os.listdir(root) if d.startswith("step-"))
            for old in kept[:-self.config.keep_checkpoints]:
                if old != name:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        if self.distributed:

            dist.barrier()
        self._saved_step = self.step
        return path

    def latest_checkpoint(self) -> Optional[str]:
        """The checkpoint latest.json names; if that one is gone, the newest complete ``step-N``; else None."""
        root = self._ckpt_root()
        try:
            with open(os.path.join(root, LATEST), "r", encoding="utf-8") as f:
                name = json.load(f)["checkpoint"]
            if os.path.isfile(os.path.join(root, name, STATE_FILE)):
                return os.path.join(root, name)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not os.path.isdir(root):
            return None
        done = sorted(d for d in os.listdir(root)
                      if d.startswith("step-") and os.path.isfile(os.path.join(root, d, STATE_FILE)))
        return os.path.join(root, done[-1]) if done else None

    def load_checkpoint(self, path: Optional[str] = None) -> None:
        """Restore weights, optimizer, scheduler, RNG and step from a checkpoint (default: the latest)."""

        path = path or self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self._ckpt_root()}")
        state_path = os.path.join(path, STATE_FILE)
        weights = os.path.join(path, "draft", "model.safetensors")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            sd = load_file(weights)
        except Exception as e:
            raise ValueError(f"corrupt checkpoint {path}: {e}") from e
        saved = state["config"]
        diff = sorted(k for k in saved if k not in _RESUME_FREE and _norm(saved[k]) != _norm(
            getattr(self.config, k, None)))
        if state.get("data") != self.data_fingerprint:
            raise ValueError(f"cannot resume {path}: it was trained on other data than {self.config.data_dir}")
        if diff or state["world_size"] != self.world_size:
            what = ", ".join(f"{k}: {saved[k]!r} -> {getattr(self.config, k, None)!r}" for k in diff)
            if state["world_size"] != self.world_size:
                what += f"{', ' if what else ''}processes: {state['world_size']} -> {self.world_size}"
            raise ValueError(f"cannot resume {path} with different settings ({what})")
        step = int(state["step"])
        if step > self.total_steps:
            raise ValueError(f"cannot resume {path}: it is at step {step}, past the {self.total_steps} steps this run "
                             f"is set to (pass max_steps >= {step})")
        missing = self.draft.load_state_dict({k: v.to(self.device) for k, v in sd.items()}, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"corrupt checkpoint {path}: weights do not match the draft "
                             f"(missing {missing.missing_keys}, unexpected {missing.unexpected_keys})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The learning rate of the next step, from this run's schedule: the saved one unless max_steps or epochs
        # changed (the same expression LambdaLR evaluates, so an unchanged schedule stays bit for bit).
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self._lr_factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        _set_rng_state(state["rng"][self.rank])
        self.step = self._saved_step = step
        self.history = list(state.get("history", []))
        self._window = list(state.get("window", []))
        if self.rank == 0:  # the log restarts from the checkpoint: records of lost steps are dropped
            os.makedirs(self.config.out_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.config.out_dir, LOG_FILE),
                               "".join(json.dumps(r) + "\n" for r in self.history).encode())

    def _clean_temporaries(self) -> None:
        """Remove what a killed checkpoint, export or log write left behind: temporary names of those writers only
        (dot-names in checkpoints/ and draft/, and the export's and log's temporaries in out_dir)."""
        if self.rank != 0:
            return
        out = self.config.out_dir
        found = []
        for folder, prefixes in ((self._ckpt_root(), (".",)), (os.path.join(out, DRAFT_DIR), (".",)),
                                 (out, (".draft-", f".{LOG_FILE}."))):
            if os.path.isdir(folder):
                found += [os.path.join(folder, d) for d in os.listdir(folder) if d.startswith(prefixes)]
        for p in found:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(p)

    # ---- starting, stopping ------------------------------------------------------------------------------------

    def _start_point(self, resume):
        """The checkpoint to continue from (None: a new run), or the error to raise, for ``train(resume)``."""
        out = self.config.out_dir
        ckpt = self.latest_checkpoint()
        if resume == "auto":
            resume = ckpt is not None
        if resume:
            if ckpt is None:
                return FileNotFoundError(f"nothing to resume: {out} holds no checkpoint; start a new run without "
                                         "--resume (resume=False)")
            return ckpt
        found = [d for d in (LOG_FILE, CHECKPOINTS, DRAFT_DIR) if os.path.exists(os.path.join(out, d))]
        if not found:
            return None
        if ckpt is None:
            return ValueError(f"{out} already holds a training run ({', '.join(found)}) with no checkpoint to "
                              "continue from: remove it or choose a new --out")
        return ValueError(f"{out} already holds a training run ({', '.join(found)}): continue it with --resume "
                          "(resume=True) or choose a new --out")

    def _catch_stop_signals(self) -> dict:
        """SIGINT and SIGTERM ask the loop to stop after the current step and write a checkpoint. The same signal
        again acts as usual (a second Ctrl-C raises KeyboardInterrupt, a second SIGTERM ends the process)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal == name:
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            if self._stop_signal is None and self.rank == 0:
                print(f"\n{name}: stopping after the current step and writing a checkpoint (send {name} again to "
                      "stop at once, without one)", file=sys.stderr, flush=True)
            self._stop_signal = self._stop_signal or name

        for name in _STOP_SIGNALS:
            s = getattr(signal, name)
            previous[s] = signal.getsignal(s)
            if previous[s] is None:  # installed outside Python: restore the default
                previous[s] = signal.SIG_DFL
            signal.signal(s, on_signal)
        return previous

    def _stop_requested(self) -> Optional[str]:
        """The signal that stops the run, agreed by all processes (they stop after the same step)."""
        if not self.distributed:
            return self._stop_signal

        flag = torch.tensor([0 if self._stop_signal is None else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (self._stop_signal or "SIGTERM") if int(flag) else None

    # ---- the loop ------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            os.makedirs(self.config.out_dir, exist_ok=True)
            with open(os.path.join(self.config.out_dir, LOG_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, resume=False) -> dict:
        """Run training to ``total_steps``; returns the final evaluation. The final draft is written to
        ``out_dir/draft`` in the EAGLE layout.

        resume: False starts a new run (refused when out_dir already holds one); True continues from the latest
            checkpoint (refused when there is none); "auto" continues when there is a checkpoint, else starts.
        Raises TrainingInterrupted when SIGINT or SIGTERM stopped the run (after writing a checkpoint).
        """
        if resume not in (False, True, "auto"):
            raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
        start = [self._start_point(resume) if self.rank == 0 else None]
        if self.distributed:  # rank 0 decides for all: the others never see its first writes

            dist.broadcast_object_list(start, src=0)
        if isinstance(start[0], Exception):
            raise start[0]
        self._clean_temporaries()
        if start[0] is not None:
            self.load_checkpoint(start[0])
        previous = self._catch_stop_signals()
        try:
            return self._run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._stop_signal = None
            self._clean_temporaries()

    def _run(self) -> dict:

        c = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=f"train-{c.mode}",
                   disable=not c.progress or self.rank != 0)
        t0 = time.time()
        try:
            stopped = self._stop_requested()
            while self.step < self.total_steps and stopped is None:
                rec = self.train_step()
                self._window.append(rec["loss"])
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    rec["loss_avg"] = sum(self._window) / len(self._window)
                    rec["elapsed"] = time.time() - t0
                    self._window = []
                    self._log({"kind": "train", **rec})
                    bar.set_postfix(loss=f"{rec['loss_avg']:.4f}", lr=f"{rec['lr']:.2e}")
                stopped = self._stop_requested()
                if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps and not stopped:
                    self._log({"kind": "eval", "step": self.step, **self.evaluate()})
                if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        if stopped is not None:
            path = self.save_checkpoint() if self._saved_step != self.step else self.latest_checkpoint()
            raise TrainingInterrupted(
                f"training stopped by {stopped} at step {self.step} of {self.total_steps}; checkpoint {path} "
                "written: continue with the same command and --resume (Trainer.train(resume=True))",
                stopped, self.step, path)
        last = self.history[-1] if self.history else {}
        if self._saved_step == self.step and last.get("kind") == "eval" and last.get("step") == self.step:
            final = last  # a finished run resumed: its final evaluation and checkpoint are there already
        else:
            final = {"kind": "eval", "step": self.step, **self.evaluate()}
            self._log(final)
            self.save_checkpoint()
        if self.rank == 0:
            self.export(os.path.join(c.out_dir, DRAFT_DIR))
        if self.distributed:

            dist.barrier()
        return final

    def export(self, path: str) -> str:
        """Write the draft in the EAGLE layout (config.json + model.safetensors), atomically."""

        return save_draft(self.draft, path)

def _norm(v):
    """Compare configs across a JSON/pickle round trip (tuples become lists)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}")
    return TrainConfig(**d)
