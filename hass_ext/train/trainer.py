"""The draft trainer: HASS (harmonized context alignment + top-K distillation) or the EAGLE baseline.

One optimizer step (hass-reference.md §3):

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
replaced, so an interruption never leaves a half-written checkpoint behind.

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
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .align import ATTENTION_MODES, align_forward, next_level
from .evaluate import evaluate_batch, merge_counts, summarize
from .loss import MASK_ALIGNMENTS, step_loss, target_stats, training_pairs, uniform_noise
from .shards import ShardDataset, atomic_write_bytes, atomic_write_json, collate

MODES = ("hass", "eagle")
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_FILE = "trainer_state.pt"


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
    noise_scale_by_length: bool = True         # reference: amplitude std * 512 / n (P-5); False: std
    mask_alignment: str = "predicted"          # see loss.py
    attention: str = "proper"                  # "reference" = the reference's leaky softmax (P-1)
    autocast: str = "auto"                     # "auto": bf16 on CUDA, fp32 on CPU; "bf16": bf16 on any device
                                               # (fast on CPUs with AMX/avx512_bf16); "off": fp32
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int = 0                        # steps; 0 = only at the end
    eval_k: int = 5                            # chain length of the k-step acceptance
    eval_max_examples: Optional[int] = None
    save_every: int = 0                        # steps; 0 = only at the end
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
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.draft_vocab is not None and (isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int)
                                             or self.draft_vocab < self.topk):
            raise ValueError(f"draft_vocab must be an int >= topk ({self.topk}) or None, got {self.draft_vocab!r}")


# Settings a resumed run may change (they do not affect the trained weights).
_RESUME_FREE = {"out_dir", "data_dir", "eval_every", "eval_max_examples", "save_every", "keep_checkpoints",
                "log_every", "verify_checksum", "progress", "init_from"}


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
    import numpy as np

    st = np.random.get_state()
    cuda = [bytes(t.numpy()) for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": bytes(torch.get_rng_state().numpy()), "cuda": cuda, "python": random.getstate(),
            "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}


def _set_rng_state(state: dict) -> None:
    import numpy as np

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
        import torch.distributed as dist

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
            from .token_map import hot_vocabulary, template_token_ids, token_frequencies

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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_warmup_decay(self.warmup_steps, self.total_steps))
        module = _AlignStep(self.draft)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = module
        self.step = 0
        self._perm_epoch, self._perm = None, None
        self.history: List[dict] = []

    # ---- setup ---------------------------------------------------------------------------------------------

    def _resolve_target(self, target, manifest):
        from ..target import DEFAULT_TARGET, Target, load_target

        if target is None or isinstance(target, str):
            name = target or manifest["target"]
            target = load_target(None if name == DEFAULT_TARGET else name, dtype=torch.float32, device="cpu")
        if not isinstance(target, Target):
            raise ValueError(f"target must be None, a model name/path or a hass_ext.Target, "
                             f"got {type(target).__name__}")
        h, v = int(target.config.hidden_size), int(target.config.vocab_size)
        if (h, v) != (manifest["hidden_size"], manifest["vocab_size"]):
            raise ValueError(f"the target {target.name} (hidden {h}, vocab {v}) does not match the data in "
                             f"{self.config.data_dir} (prepared with {manifest['target']}: hidden "
                             f"{manifest['hidden_size']}, vocab {manifest['vocab_size']})")
        return target

    def _make_draft(self, target):
        from ..draft import init_draft

        c = self.config
        if c.init_from:
            from ..checkpoint import load_draft

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
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "lr": lr, "loss": sum(p["loss"] for p in parts) / len(parts),
                "steps": parts, "grad_norm": grad_norm}

    # ---- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """k-step acceptance and per-step losses on the held-out examples (all processes share the work), with the
        proper attention normalisation also for drafts trained with the reference's leaky one (P-1)."""
        c = self.config
        n = len(self.eval_set) if c.eval_max_examples is None else min(len(self.eval_set), c.eval_max_examples)
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
        if not counts:
            counts = {"correct": [0] * c.eval_k, "total": [0] * c.eval_k, "loss": [0.0] * c.align_steps,
                      "tokens": [0] * c.align_steps}
        if self.distributed:
            import torch.distributed as dist

            for key in counts:
                t = torch.tensor(counts[key], dtype=torch.float64, device=self.device)
                dist.all_reduce(t)
                counts[key] = t.tolist()
        return summarize(counts)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _ckpt_root(self) -> str:
        return os.path.join(self.config.out_dir, CHECKPOINTS)

    def save_checkpoint(self) -> Optional[str]:
        """Write ``checkpoints/step-N`` atomically (rank 0) and point latest.json at it."""
        rngs = [_rng_state()]
        if self.distributed:
            import torch.distributed as dist

            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, _rng_state())
        path = None
        if self.rank == 0:
            from ..checkpoint import save_draft

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
                            "target": self.target_name, "data": self.data_fingerprint, "history": self.history},
                           os.path.join(tmp, STATE_FILE))
                if os.path.exists(path):
                    shutil.rmtree(path)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
            atomic_write_json(os.path.join(root, LATEST), {"step": self.step, "checkpoint": name})
            kept = sorted(d for d in os.listdir(root) if d.startswith("step-"))
            for old in kept[:-self.config.keep_checkpoints]:
                if old != name:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return path

    def latest_checkpoint(self) -> Optional[str]:
        p = os.path.join(self._ckpt_root(), LATEST)
        if not os.path.exists(p):
            return None
        with open(p, "r", encoding="utf-8") as f:
            name = json.load(f)["checkpoint"]
        return os.path.join(self._ckpt_root(), name)

    def load_checkpoint(self, path: Optional[str] = None) -> None:
        """Restore weights, optimizer, scheduler, RNG and step from a checkpoint (default: the latest)."""
        from safetensors.torch import load_file

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
        missing = self.draft.load_state_dict({k: v.to(self.device) for k, v in sd.items()}, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"corrupt checkpoint {path}: weights do not match the draft "
                             f"(missing {missing.missing_keys}, unexpected {missing.unexpected_keys})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][self.rank])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        if self.rank == 0:  # the log restarts from the checkpoint: records of lost steps are dropped
            os.makedirs(self.config.out_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(self.config.out_dir, "log.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in self.history).encode())

    # ---- the loop ------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            os.makedirs(self.config.out_dir, exist_ok=True)
            with open(os.path.join(self.config.out_dir, "log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, resume: bool = False) -> dict:
        """Run (or, with ``resume``, continue) training to ``total_steps``; returns the final evaluation.

        The final draft is written to ``out_dir/draft`` in the EAGLE layout.
        """
        c = self.config
        if resume and self.latest_checkpoint() is not None:
            self.load_checkpoint()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=f"train-{c.mode}",
                   disable=not c.progress or self.rank != 0)
        t0, window = time.time(), []
        try:
            while self.step < self.total_steps:
                rec = self.train_step()
                window.append(rec["loss"])
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    rec["loss_avg"] = sum(window) / len(window)
                    rec["elapsed"] = time.time() - t0
                    window = []
                    self._log({"kind": "train", **rec})
                    bar.set_postfix(loss=f"{rec['loss_avg']:.4f}", lr=f"{rec['lr']:.2e}")
                if c.eval_every and self.step % c.eval_every == 0 and self.step < self.total_steps:
                    self._log({"kind": "eval", "step": self.step, **self.evaluate()})
                if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        final = {"kind": "eval", "step": self.step, **self.evaluate()}
        self._log(final)
        self.save_checkpoint()
        if self.rank == 0:
            self.export(os.path.join(c.out_dir, "draft"))
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return final

    def export(self, path: str) -> str:
        """Write the draft in the EAGLE layout (config.json + model.safetensors), atomically."""
        from ..checkpoint import save_draft

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
