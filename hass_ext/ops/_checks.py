"""Argument checks shared by the op wrappers: each raises ValueError naming the argument, what it got and what
was expected (its shape, dtype and device)."""
import math

import torch

INDEX_DTYPES = (torch.int64,)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the attention and loss kernels take
CUDA_HEAD_DIMS = (64, 128)  # head sizes the CUDA attention kernels are instantiated for
MAX_TOPK = 64  # largest K of the distillation losses' top-K (the kernels keep it in registers)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, dims=None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {describe(t)}")


def as_index_tensor(name: str, value, device) -> torch.Tensor:
    """A tensor as it is, or a list of ints as int64 on ``device``; floats (e.g. ``[1.0, 2.5]``) are refused
    rather than truncated."""
    if isinstance(value, torch.Tensor):
        return value
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got {t.dtype} values {t.tolist()!r}")
    return t.to(torch.int64)


def check_token_ids(name: str, t, *, dims, device) -> None:
    """Token ids are int64: a float tensor of "ids" is refused (its values may not even be integers)."""
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} holds token ids and must be an int64 tensor, got {describe(t)}")
    check_tensor(name, t, dims=dims, dtypes=INDEX_DTYPES, device=device)


def wants_grad(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def softmax_scale(scale, head_dim: int) -> float:
    """The attention softmax scale: ``scale`` as a finite float, or ``1/sqrt(head_dim)`` when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def check_attention_qkv(op: str, q, k, v, q_name="q", k_name="k", v_name="v", kv_dims=4) -> None:
    """q ``[B, Hq, T, d]``; k, v ``[..., B, Hkv, L, d]`` of q's dtype and device, Hq a multiple of Hkv."""
    check_tensor(q_name, q, dims=(4,), dtypes=FLOAT_DTYPES)
    check_tensor(k_name, k, dims=(kv_dims,), dtypes=(q.dtype,), device=q.device)
    check_tensor(v_name, v, dims=(kv_dims,), dtypes=(q.dtype,), device=q.device)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {k_name} and {v_name} must have the same shape, got {describe(k)} and {describe(v)}")
    B, Hq, _, d = q.shape
    kB, Hkv, _, kd = k.shape[-4:]
    if kB != B or kd != d:
        raise ValueError(f"{op}: {k_name} must be [..., B={B}, Hkv, L, d={d}] to match {q_name} "
                         f"{tuple(q.shape)}, got {describe(k)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the query heads ({Hq}, {q_name}.shape[1]) must be a multiple of the key/value "
                         f"heads ({Hkv}, {k_name}.shape[{kv_dims - 3}]) (grouped-query attention)")
    if q.device.type == "cuda" and d not in CUDA_HEAD_DIMS:
        raise ValueError(f"{op}: the CUDA kernel supports head_dim {' or '.join(map(str, CUDA_HEAD_DIMS))}, "
                         f"got {q_name} {describe(q)}")


def check_topk(topk, vocab: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= min(MAX_TOPK, vocab):
        raise ValueError(f"topk must be an int in [1, min({MAX_TOPK}, vocab size {vocab})], got {topk!r}")


def flat_loss_mask(loss_mask, lead_shape, device, name="loss_mask") -> torch.Tensor:
    """loss_mask ``[...]`` (or ``[..., 1]``) matching lead_shape -> float32 ``[N]``.

    Float masks are weights and pass as they are; bool and integer masks (what tokenizers return: int64, int32,
    uint8) must hold only 0 and 1.
    """
    check_tensor(name, loss_mask, device=device)
    shape = tuple(loss_mask.shape)
    if shape != tuple(lead_shape) and shape != tuple(lead_shape) + (1,):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (or with a trailing 1), got "
                         f"{describe(loss_mask)}")
    if loss_mask.is_complex():
        raise ValueError(f"{name} must be a float, integer or bool tensor, got {describe(loss_mask)}")
    if not (loss_mask.is_floating_point() or loss_mask.dtype == torch.bool):
        outside = (loss_mask < 0) | (loss_mask > 1)
        if bool(outside.any()):
            bad = loss_mask[outside].unique()[:5].tolist()
            raise ValueError(f"{name} is an integer mask and must hold only 0 and 1, got values {bad} "
                             f"({describe(loss_mask)})")
    return loss_mask.detach().reshape(-1).to(torch.float32).contiguous()
