"""Exact sampling distributions and goodness-of-fit checks shared by the sampling tests."""
import torch

from hass_ext.sampling import filtered_probs


def exact_three_tokens(target, prompt, temperature, top_p, top_k):
    """p(x1, x2, x3 | prompt) under the sampling definition, by enumerating every prefix."""
    V = target.config.vocab_size
    with torch.no_grad():
        p1 = filtered_probs(target.model(prompt[None]).logits[0, -1], temperature, top_p, top_k).double()
        x1 = torch.arange(V)[:, None]
        l2 = target.model(torch.cat([prompt.expand(V, -1), x1], 1)).logits[:, -1]
        p2 = filtered_probs(l2, temperature, top_p, top_k).double()                       # [V(x1), V(x2)]
        pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
        l3 = target.model(torch.cat([prompt.expand(V * V, -1), pairs], 1)).logits[:, -1]
        p3 = filtered_probs(l3, temperature, top_p, top_k).double().view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit on the cells with expected count >= 5, the others pooled into one cell."""
    from scipy.stats import chisquare

    n = float(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if float(expected[~big].sum()) > 0:
        obs, exp = torch.cat([obs, counts[~big].sum()[None]]), torch.cat([exp, expected[~big].sum()[None]])
    return float(chisquare(obs.numpy(), (exp * (n / exp.sum())).numpy()).pvalue), int(big.sum())


def goodness_of_fit(counts, exact, generator, ref_samplers=50):
    """Counts ``[V, V, V]`` of sampled 3-token continuations against their exact distribution: chi-square
    ``(p-value, cells)`` of the joint and of each position, the total-variation distance, and the distances that
    ``ref_samplers`` exact samplers with as many draws reach (``generator`` draws them)."""
    n = int(counts.sum())
    pvalues = {"joint": chi2_pvalue(counts.flatten(), exact.flatten())}
    for pos in range(3):
        dims = tuple(d for d in range(3) if d != pos)
        pvalues[f"x{pos + 1}"] = chi2_pvalue(counts.sum(dims), exact.sum(dims))
    flat = exact.flatten()
    tv = 0.5 * float((counts.flatten() / n - flat).abs().sum())
    ref_tv = torch.tensor([0.5 * float((torch.bincount(torch.multinomial(flat, n, replacement=True,
                                                                          generator=generator),
                                                       minlength=flat.numel()) / n - flat).abs().sum())
                           for _ in range(ref_samplers)])
    return pvalues, tv, ref_tv
