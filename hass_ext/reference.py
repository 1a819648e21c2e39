"""Plain-PyTorch oracles of the hass kernels. Used only by tests and benchmarks, never by the product path."""
import torch


def compact_kv_reference(caches, src_slots: torch.Tensor, dst_start: torch.Tensor) -> None:
    """In-place oracle of ops.compact_kv: gather every source entry, then write the destinations."""
    if isinstance(caches, torch.Tensor):
        caches = [caches]
    src = src_slots.reshape(-1, src_slots.shape[-1])
    dst = dst_start.reshape(-1)
    for c in caches:
        bdim = c.dim() - 4
        for b in range(src.shape[0]):
            idx = src[b][src[b] >= 0]
            row = c.select(bdim, b)  # [..., H, S, D]
            moved = row.index_select(-2, idx).clone()
            row[..., int(dst[b]):int(dst[b]) + idx.numel(), :] = moved


# ---- verify_tree ------------------------------------------------------------------------------------------

def verify_tree_reference(target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor,
                          temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                          generator: torch.Generator = None, uniforms: torch.Tensor = None):
    """Oracle of ops.verify_tree: the accept/renormalise walk on filtered_probs, one row and one sibling at a time.

    With the same generator state (or the same uniforms) it consumes the same random stream as the CPU kernel:
    ``uniforms[b, c]`` decides child node c, ``uniforms[b, 0]`` draws the final token by inverse CDF.
    """
    from .sampling import filtered_probs

    B, n, V = target_logits.shape
    greedy = temperature == 0
    if not greedy and uniforms is None:
        uniforms = torch.rand(B, n, generator=generator, dtype=torch.float32, device=target_logits.device)
    accepted = torch.full((B, n), -1, dtype=torch.int64)
    accept_len = torch.zeros(B, dtype=torch.int64)
    next_token = torch.zeros(B, dtype=torch.int64)
    par = parents.cpu().tolist()
    tok = draft_tokens.cpu().tolist()
    u = None if greedy else uniforms.cpu().tolist()
    for b in range(B):
        node, path = 0, [0]
        while True:
            row = target_logits[b, node].float().cpu()
            if torch.isnan(row).any() or (row == float("inf")).any() or not torch.isfinite(row).any():
                raise ValueError(f"target_logits[{b}, {node}] contains NaN or +Inf, or no finite logit")
            children = [c for c in range(node + 1, n) if par[b][c] == node]
            nxt = None
            if greedy:
                best = int(torch.argmax(row))
                nxt = next((c for c in children if tok[b][c] == best), None)
            else:
                p = filtered_probs(row, temperature, top_p, top_k)
                rejected = set()
                for c in children:
                    x = tok[b][c]
                    if x in rejected:
                        continue
                    if u[b][c] < float(p[x]):
                        nxt = c
                        break
                    rejected.add(x)
                    p[x] = 0.0
                    p = p / p.sum()
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        accepted[b, :len(path)] = torch.tensor(path)
        accept_len[b] = len(path) - 1
        if greedy:
            next_token[b] = int(torch.argmax(row))
        else:  # inverse CDF over the residual in token-id order: first token whose cumulative mass exceeds u
            cum = torch.cumsum(p.double(), 0)
            j = int(torch.searchsorted(cum, u[b][0] * cum[-1], right=True))
            next_token[b] = min(j, int(p.nonzero().max()))
    return accepted, accept_len, next_token
