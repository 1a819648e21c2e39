"""verify_tree: which drafted tokens of a token tree the target accepts (lossless speculative sampling)."""
import torch

from .. import _library  # noqa: F401  (registers torch.ops.hass.*)
from ..sampling import check_sampling_args
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, check_token_ids, describe


@torch.library.register_fake("hass::verify_tree")
def _verify_tree_fake(target_logits, draft_tokens, parents, temperature=0.0, top_p=1.0, top_k=0, uniforms=None,
                      generator=None):
    B, n = draft_tokens.shape
    return draft_tokens.new_empty((B, n)), draft_tokens.new_empty((B,)), draft_tokens.new_empty((B,))


def verify_tree(target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator = None, uniforms: torch.Tensor = None):
    """Decide in one call which drafted tokens of a token tree the target accepts (lossless speculative sampling).

    target_logits: ``[B, n, V]`` (or ``[n, V]``) float32/bfloat16/float16, the target's logits at the n tree
        nodes; node 0 is the root (the last committed token). The last dim must be contiguous (else copied).
    draft_tokens: int64 ``[B, n]`` (or ``[n]``), the token of each node (entry 0 is ignored).
    parents: int64 ``[B, n]`` (or ``[n]``), ``parents[:, 0] == -1`` and ``0 <= parents[:, i] < i``.
    temperature, top_p, top_k: the target distribution of hass_ext.sampling (temperature 0 = greedy).
    generator: torch.Generator of the tensors' device (default generator when None). CPU: ``[B, n]`` uniforms
        are drawn from it with torch.rand; CUDA: a Philox seed/offset is taken from it (graph-capturable).
    uniforms: optional float32 ``[B, n]`` in [0, 1) replacing the generator: ``uniforms[:, c]`` decides child
        node c when it is tried, ``uniforms[:, 0]`` draws the final token (tests use it to share a stream).

    Returns ``(accepted, accept_len, next_token)``: ``accepted [B, n]`` int64 node indices of the accepted path
    (starting with 0, padded with -1), ``accept_len [B]`` accepted draft tokens (root excluded), ``next_token
    [B]`` the bonus/correction token drawn from the target at the end of the path.

    Rule (children of a node are tried in node-index order): T = 0 follows the first child whose token is the
    argmax (ties: lowest id); next_token is the argmax at the last node. T > 0 accepts child token x with
    probability p(x), on rejection sets p(x) = 0 and renormalises before the next sibling (siblings repeating a
    rejected token are skipped); next_token is drawn from the residual, or from p at the end of the path.
    Every path uses the same temperature/top-k/top-p distribution, the final draw included.

    Errors (ValueError): malformed tree, token ids outside [0, V), shape/dtype/device mismatches, bad sampling
    arguments, and a NaN or +Inf logit (or no finite logit) in the row of a node the walk visits (-inf logits
    are allowed: probability 0). On CUDA, value errors are found in the kernel and raised after it (one status
    read); under CUDA graph capture nothing is read and such rows come back as -1.
    """
    check_sampling_args(temperature, top_p, top_k)
    check_tensor("target_logits", target_logits, dims=(2, 3), dtypes=FLOAT_DTYPES)
    device = target_logits.device
    unbatched = target_logits.dim() == 2
    want = 1 if unbatched else 2
    check_token_ids("draft_tokens", draft_tokens, dims=(want,), device=device)
    check_tensor("parents", parents, dims=(want,), dtypes=INDEX_DTYPES, device=device)
    if unbatched:
        target_logits, draft_tokens, parents = target_logits[None], draft_tokens[None], parents[None]
    B, n, V = target_logits.shape
    if n < 1 or V < 1:
        raise ValueError(f"target_logits needs at least one node and one token, got {describe(target_logits)}")
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents)):
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)} to match target_logits [B, n, V], got {describe(t)}")
    if uniforms is not None:
        check_tensor("uniforms", uniforms, dims=(want,), dtypes=(torch.float32,), device=device)
        uniforms = uniforms[None] if unbatched else uniforms
        if tuple(uniforms.shape) != (B, n):
            raise ValueError(f"uniforms must have shape {(B, n)}, got {describe(uniforms)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the tensors are on {device}")
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    accepted, accept_len, next_token = torch.ops.hass.verify_tree(
        target_logits, draft_tokens, parents, float(temperature), float(top_p), int(top_k), uniforms, generator)
    if unbatched:
        return accepted[0], accept_len[0], next_token[0]
    return accepted, accept_len, next_token
