"""Draft I/O: loading, resolving and saving EAGLE/HASS draft folders, their token maps and tree profiles.

A draft folder is the published EAGLE/HASS layout: ``config.json`` and the weights as ``model.safetensors`` or
``pytorch_model.bin``. Keys (no ``model.`` prefix, no lm_head, no final norm, no rotary buffers):
``embed_tokens.weight`` (the target's input embedding; ``load_draft`` copies it from the target when absent),
``fc.weight``, ``fc.bias`` (optional: its presence decides the fc bias), ``layers.0.self_attn.{q,k,v,o}_proj.weight``
(q/k/v biases when present), ``layers.0.mlp.{gate,up,down}_proj.weight``, ``layers.0.post_attention_layernorm.weight``.
Stray ``*rotary_emb.inv_freq`` keys are ignored. What ``save_draft`` writes (embedding included by default) is what
the EAGLE/HASS reference loaders, SGLang and vLLM load for an EAGLE-1/2 draft.

A draft with a hot vocabulary (``draft.hot_token_ids``) also gets ``token_map.pt``: the sorted target token ids as
a 1-D int64 tensor saved with ``torch.save``, the file SGLang's ``--speculative-token-map`` loads (it reads it with
``torch.load(weights_only=True)`` and slices the draft's lm_head with it). ``load_draft`` applies it when present.
A draft whose tree shapes were measured (hass_ext.tree_choice) also gets ``tree_profile.json``, which
``generate(total_tokens="auto")`` uses to size the tree for the device; other loaders ignore it, and a bad one is
ignored here too, with a warning.

These are draft checkpoints for inference; training checkpoints (optimizer state, resumption) are
hass_ext.train's.
"""
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from typing import Optional

import torch

from .atomic_io import atomic_write_bytes, atomic_write_json
from .draft import DraftConfig, DraftModel, check_draft_matches_target, check_token_map, target_parts
from .tree import check_tree_options

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
TOKEN_MAP_NAME = "token_map.pt"
PROFILE_NAME = "tree_profile.json"
PROFILE_FORMAT = 1


class CheckpointError(ValueError):
    """A draft checkpoint that cannot be loaded (missing, corrupt, or not matching its config or target)."""


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- resolution: what generate(draft=...) accepts ----------------------------------------------------------

_DEFAULT_DRAFTS = {}


def resolve_draft(draft, target) -> DraftModel:
    """The draft for ``target``: "default" (the packaged one), a checkpoint folder, or a DraftModel (checked)."""
    if isinstance(draft, str) and draft == "default":
        key = (id(target.model), str(target.device), target.dtype)
        if key not in _DEFAULT_DRAFTS:  # loaded once per target: generate(draft="default") in a loop stays cheap
            _DEFAULT_DRAFTS.clear()
            _DEFAULT_DRAFTS[key] = load_draft(default_draft_path(target), target=target)
        return _DEFAULT_DRAFTS[key]
    if isinstance(draft, (str, os.PathLike)):
        return load_draft(draft, target=target)
    if not isinstance(draft, DraftModel):
        raise ValueError(f"draft must be None, 'default', a checkpoint folder or a hass_ext.DraftModel, "
                         f"got {type(draft).__name__}")
    check_draft_matches_target(draft.config, target)
    if draft.device != target.device or draft.dtype != target.dtype:
        raise ValueError(f"the draft is on {draft.device} / {draft.dtype} but the target is on {target.device} / "
                         f"{target.dtype}; move it with draft.to(device=..., dtype=...)")
    head = target.model.get_output_embeddings().weight
    if draft.lm_head_weight is not head:
        draft.set_lm_head(head)
    return draft


def default_draft_path(target) -> str:
    """The draft packaged for ``target`` under hass_ext/drafts/<target name>/, or a clear error."""
    name = os.path.basename(str(target.name).rstrip("/"))
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drafts", name)
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"no default draft ships for {target.name} yet: pass draft=<checkpoint folder> or a "
                         f"DraftModel (hass_ext.load_draft / hass_ext.init_draft), or draft=None for vanilla "
                         f"decoding")
    return folder


# ---- the tree profile (tree_profile.json) ------------------------------------------------------------------

def check_profile(profile, where: str = "tree profile") -> dict:
    """Validate a tree profile dict (ValueError naming what is wrong)."""
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{where}: not a tree profile of format {PROFILE_FORMAT}")
    shapes = profile.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise ValueError(f"{where}: no shapes")
    for s in shapes:
        try:
            check_tree_options(int(s["total_tokens"]), int(s["depth"]), int(s["tree_topk"]))
            tau = float(s["tau"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad shape entry {s!r}: {e}") from e
        if math.isnan(tau) or not (1.0 <= tau <= int(s["depth"]) + 1):
            raise ValueError(f"{where}: tau {tau} of {s!r} is outside [1, depth + 1]")
    return profile


def save_profile(profile: dict, draft_dir) -> str:
    """Write ``draft_dir/tree_profile.json`` atomically; returns its path."""
    check_profile(profile)
    path = os.path.join(os.fspath(draft_dir), PROFILE_NAME)
    atomic_write_json(path, profile)
    return path


def load_profile(draft_dir) -> Optional[dict]:
    """The profile saved beside a draft, or None when there is none (ValueError for a bad one)."""
    path = os.path.join(os.fspath(draft_dir), PROFILE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return check_profile(raw, path)


# ---- loading ------------------------------------------------------------------------------------------------

def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path} is not a draft checkpoint: {CONFIG_NAME} is missing")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e


def _read_weights(path: str) -> dict:
    st, bin_ = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):  # preferred: no pickle
        from safetensors import SafetensorError  # here, not at the top: start-up time of import hass_ext
        from safetensors.torch import load_file  # start-up, as above

        try:
            return load_file(st, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{st} is corrupt or not a safetensors file: {e}") from e
    if os.path.isfile(bin_):
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle/zip
            raise CheckpointError(f"{bin_} is corrupt or not a torch weights file: {e}") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{bin_} does not hold a flat dict of tensors (a state dict)")
        return sd
    raise CheckpointError(f"{path} has no weights: expected {SAFETENSORS_NAME} or {BIN_NAME}")


def save_token_map(token_ids, path, vocab_size: Optional[int] = None) -> str:
    """Write a hot vocabulary as SGLang's ``--speculative-token-map`` file: a 1-D int64 tensor of sorted target
    token ids in a ``torch.save`` file (written atomically). Returns ``path``."""
    path = os.fspath(path)
    ids = check_token_map(token_ids, vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, _torch_bytes(ids.clone()))
    return path


def load_token_map(path, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Read a token map file (a 1-D tensor or list of token ids saved with ``torch.save``, as SGLang's
    ``--speculative-token-map``); returns the sorted int64 ids. CheckpointError for a bad file."""
    path = os.fspath(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise CheckpointError(f"{path} is not a token map file (torch.save of a 1-D tensor of ids): {e}") from e
    try:
        return check_token_map(raw, vocab_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _expected_shapes(c: DraftConfig) -> dict:
    H, I, d = c.hidden_size, c.intermediate_size, c.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, H), "fc.weight": (H, 2 * H), "fc.bias": (H,)}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, H),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, H),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, H),
            p + "self_attn.o_proj.weight": (H, c.num_attention_heads * d),
            p + "self_attn.q_proj.bias": (c.num_attention_heads * d,),
            p + "self_attn.k_proj.bias": (c.num_key_value_heads * d,),
            p + "self_attn.v_proj.bias": (c.num_key_value_heads * d,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
            p + "post_attention_layernorm.weight": (H,),
        })
        if i > 0:
            shapes[p + "input_layernorm.weight"] = (H,)
    return shapes


def load_draft(path, target=None, dtype: Optional[torch.dtype] = None, device=None) -> DraftModel:
    """Load an EAGLE/HASS draft checkpoint folder.

    target: the ``hass_ext.Target`` (or transformers model) the draft serves. It supplies the lm_head, the
        embedding when the checkpoint has none, and the default dtype and device; its vocabulary and hidden
        size must match the draft's. Without a target the draft has no head until ``set_lm_head``.
    dtype, device: override the target's (or, without a target, the checkpoint's dtype and the CPU).
    Raises CheckpointError (a ValueError) for a missing, corrupt or inconsistent checkpoint; nothing is
    returned half-loaded.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"draft checkpoint folder not found: {path}")
    raw = _read_config(path)
    try:
        config = DraftConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from e
    sd = {k: v for k, v in _read_weights(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if target is not None:
        check_draft_matches_target(config, target)

    # fc bias and q/k/v biases are decided by the keys (released configs contradict their weights: docs/algorithms.md#p2-fc-bias).
    has_fc_bias = "fc.bias" in sd
    if "bias" in raw and bool(raw["bias"]) != has_fc_bias:
        warnings.warn(f"{path}: config says bias={raw['bias']} but the weights {'have' if has_fc_bias else 'lack'} "
                      "fc.bias; following the weights", stacklevel=2)
    config.bias = has_fc_bias
    config.qkv_bias = "layers.0.self_attn.q_proj.bias" in sd

    shapes = _expected_shapes(config)
    expected = {k for k in shapes if not k.endswith(".bias") or (k == "fc.bias" and has_fc_bias)
                or (k.endswith("_proj.bias") and config.qkv_bias)}
    unexpected = sorted(set(sd) - expected)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys for an EAGLE draft with {config.num_hidden_layers} layer(s): "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(expected - set(sd) - {"embed_tokens.weight"})
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != shapes[k]:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the config implies {shapes[k]}")
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: {k} has dtype {v.dtype}, expected a floating-point tensor")

    head = None
    if target is not None:
        _, emb, head = target_parts(target)
        if "embed_tokens.weight" not in sd:
            sd["embed_tokens.weight"] = emb.detach().to("cpu", torch.float32)
    elif "embed_tokens.weight" not in sd:
        raise CheckpointError(f"{path} has no embed_tokens.weight; pass target= to copy the target's embedding")

    if dtype is None:
        dtype = head.dtype if head is not None else sd["fc.weight"].dtype
    if device is None:
        device = head.device if head is not None else torch.device("cpu")
    token_map_path = os.path.join(path, TOKEN_MAP_NAME)
    token_map = load_token_map(token_map_path, config.vocab_size) if os.path.isfile(token_map_path) else None
    draft = DraftModel(config)
    draft.load_state_dict(sd, strict=True)
    draft.set_token_map(token_map)
    try:
        draft.tree_profile = load_profile(path)
    except ValueError as e:  # an optional file: the draft works without it, the tree is then sized without it
        warnings.warn(f"ignoring the tree profile of the draft: {e}", stacklevel=2)
        draft.tree_profile = None
    draft = draft.to(device=device, dtype=dtype).eval()
    if head is not None:
        draft.set_lm_head(head)
    return draft


def _state_dict_for_save(draft: DraftModel, dtype: Optional[torch.dtype], embedding: bool = True) -> dict:
    out = {}
    for k, v in draft.state_dict().items():
        if not embedding and k == "embed_tokens.weight":
            continue
        v = v.detach()
        if dtype is not None:
            v = v.to(dtype)
        out[k] = v.to("cpu").contiguous().clone()  # own storage: safetensors refuses shared tensors
    return out


def save_draft(draft: DraftModel, path, safe_serialization: bool = True, dtype: Optional[torch.dtype] = None,
               embedding: bool = True) -> str:
    """Write ``draft`` as an EAGLE/HASS checkpoint folder (``config.json`` + ``model.safetensors``, or
    ``pytorch_model.bin`` with ``safe_serialization=False``); returns the folder.

    The hot vocabulary, if the draft has one, goes to ``token_map.pt`` (also SGLang's
    ``--speculative-token-map`` file); saving a draft without one removes a stale ``token_map.pt``.
    Atomic: a new folder is written under a temporary name and renamed into place; into an existing folder each
    file is written to a temporary name and renamed over the old one (weights first, config last), and a weights
    file of the other format is removed so the folder never holds two different drafts.
    dtype: convert the weights (default: the draft's dtype).
    embedding: True (the default) writes ``embed_tokens.weight``, which the EAGLE/HASS reference loaders require
        (they load the draft strictly); False leaves it out for engines that take the draft's embedding from the
        target (``load_draft`` copies it from there too), halving the file for a large vocabulary.
    """
    if not isinstance(draft, DraftModel):
        raise ValueError(f"save_draft needs a hass_ext.DraftModel, got {type(draft).__name__}")
    path = os.fspath(path)
    sd = _state_dict_for_save(draft, dtype, embedding)
    cfg = draft.config.to_dict()
    cfg["torch_dtype"] = str(sd["fc.weight"].dtype).replace("torch.", "")
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    if safe_serialization:
        from safetensors.torch import save as safetensors_bytes  # start-up time of import hass_ext

        weights = safetensors_bytes(sd, metadata={"format": "pt"})
    else:
        weights = _torch_bytes(sd)
    files = {weights_name: weights}  # written in this order: config last
    token_map = draft.hot_token_ids
    if token_map is not None:
        files[TOKEN_MAP_NAME] = _torch_bytes(token_map.detach().to("cpu", torch.int64).clone())
    if draft.tree_profile is not None:
        files[PROFILE_NAME] = (json.dumps(draft.tree_profile, indent=1) + "\n").encode()
    files[CONFIG_NAME] = (json.dumps(cfg, indent=2) + "\n").encode()
    # files of a previous save that would now describe other weights
    stale = [BIN_NAME if safe_serialization else SAFETENSORS_NAME] + [
        name for name in (TOKEN_MAP_NAME, PROFILE_NAME) if name not in files]

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if not os.path.exists(path):
        tmp = tempfile.mkdtemp(prefix=".draft-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
        try:
            for name, data in files.items():
                atomic_write_bytes(os.path.join(tmp, name), data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return path
    if not os.path.isdir(path):
        raise ValueError(f"save_draft: {path} exists and is not a folder")
    for name in stale[1:]:  # the token map / profile first: they belong to the old weights
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    for name, data in files.items():
        atomic_write_bytes(os.path.join(path, name), data)
    if os.path.exists(os.path.join(path, stale[0])):
        os.remove(os.path.join(path, stale[0]))
    return path
