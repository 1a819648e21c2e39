"""The sampling distribution every decoding path in hass_ext uses (vanilla, speculative, verify_tree).

Given logits z, temperature T > 0, top_k and top_p, the target distribution is:

1. p = softmax(z / T) in fp32.
2. top_k > 0: keep the tokens whose logit is >= the k-th largest logit (ties at the boundary are all kept).
3. top_p < 1: among the kept tokens, renormalise, then keep every token whose probability is >= tau, where tau
   is the largest probability value such that the kept mass {p >= tau} is >= top_p (ties are all kept;
   the most likely token always survives).
4. Renormalise over the kept tokens.

Thresholds instead of a sort make the definition tie-stable and let the kernels compute it by streaming the
vocabulary. T = 0 means greedy: the argmax, ties decided by the lowest token id; 0 < T < MIN_TEMPERATURE is
refused (use 0).
"""
import math

import torch

# Below this a temperature is greedy in all but name, and logits / T overflow float32 (1e-40 is not even a
# normal float32): such values are refused instead of producing NaN probabilities.
MIN_TEMPERATURE = 1e-6


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """Raise ValueError naming the offending argument."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    if not _is_number(top_p) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The target distribution (module docstring) over the last dim of ``logits``; fp32, rows sum to 1."""
    if temperature <= 0:
        raise ValueError("filtered_probs needs temperature > 0; use greedy_token for T = 0")
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p = torch.sort(p, dim=-1, descending=True).values
        # mass of {p >= sorted_p[j]} is the cumulative sum up to the last entry equal to sorted_p[j]; the
        # threshold is the first sorted value whose prefix mass reaches top_p.
        cum = torch.cumsum(sorted_p, dim=-1)
        idx = torch.searchsorted(cum, torch.full_like(cum[..., :1], top_p), right=False)
        idx = idx.clamp(max=p.shape[-1] - 1)
        tau = torch.gather(sorted_p, -1, idx)
        p = torch.where(p >= tau, p, torch.zeros_like(p))
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim; ties go to the lowest token id (torch.argmax's rule on CPU and CUDA)."""
    return torch.argmax(logits, dim=-1)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator = None) -> torch.Tensor:
    """One token per row of ``logits [..., V]`` from the target distribution (greedy when temperature == 0)."""
    if temperature == 0:
        return greedy_token(logits)
    p = filtered_probs(logits, temperature, top_p, top_k)
    flat = p.reshape(-1, p.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])
