"""The one sampling definition (hass_ext.sampling) against a brute-force reading of its docstring."""
import itertools

import pytest
import torch

from hass_ext.sampling import MIN_TEMPERATURE, check_sampling_args, filtered_probs, greedy_token, sample_token


def brute_force(logits, T, top_p, top_k):
    z = [float(x) / T for x in logits]
    V = len(z)
    keep = set(range(V))
    if 0 < top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = {i for i in keep if z[i] >= kth}
    m = max(z[i] for i in keep)
    w = {i: torch.tensor(z[i] - m).exp().item() for i in keep}
    s = sum(w.values())
    p = {i: w[i] / s for i in keep}
    if top_p < 1:
        # largest tau with mass{p >= tau} >= top_p
        for tau in sorted(set(p.values()), reverse=True):
            if sum(v for v in p.values() if v >= tau) >= top_p - 1e-12:
                break
        keep = {i for i in keep if p[i] >= tau}
        s = sum(p[i] for i in keep)
        p = {i: p[i] / s for i in keep}
    return torch.tensor([p.get(i, 0.0) for i in range(V)])


@pytest.mark.parametrize("T, top_p, top_k", list(itertools.product([0.5, 1.0, 1.7], [1.0, 0.9, 0.5, 0.05],
                                                                   [0, 1, 3, 7])))
def test_filtered_probs_matches_definition(T, top_p, top_k):
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        logits = torch.randint(-4, 4, (7,), generator=gen).float() / 2  # many ties
        got = filtered_probs(logits, T, top_p, top_k)
        assert torch.allclose(got, brute_force(logits.tolist(), T, top_p, top_k), atol=1e-6)
        assert abs(float(got.sum()) - 1) < 1e-5


def test_batched_rows_and_greedy_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert greedy_token(logits).tolist() == [1, 0]
    p = filtered_probs(logits, 1.0, top_k=1)
    assert torch.allclose(p[0], torch.tensor([0, 0.5, 0.5, 0]))  # ties at the k-th value are kept
    assert torch.allclose(p[1], torch.full((4,), 0.25))


def test_sample_token_follows_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_token(logits.expand(200000, 4), 1.0, 0.8, 0, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = filtered_probs(logits, 1.0, 0.8, 0)
    assert expected[0] == 0 and expected[3] == 0
    assert (freq - expected).abs().sum() < 0.01  # TV < 0.005; the sd at n = 2e5 is ~0.001


@pytest.mark.parametrize("T, top_p, top_k, match", [
    (-1.0, 1.0, 0, "temperature"), (float("nan"), 1.0, 0, "temperature"), (1.0, 0.0, 0, "top_p"),
    (1.0, 1.01, 0, "top_p"), (1.0, 1.0, -2, "top_k"), (1.0, 1.0, 2.5, "top_k"),
])
def test_bad_args(T, top_p, top_k, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_args(T, top_p, top_k)


@pytest.mark.parametrize("T, match", [
    (True, "temperature must be a finite number"), (False, "temperature must be a finite number"),
    (float("inf"), "temperature must be a finite number"), ("0.7", "temperature must be a finite number"),
    (1e-40, "temperature must be 0 \\(greedy\\) or at least 1e-06, got 1e-40"),
    (MIN_TEMPERATURE / 2, "at least"),
])
def test_bad_temperatures_get_one_line_errors(T, match):
    with pytest.raises(ValueError, match=match) as err:
        check_sampling_args(T, 1.0, 0)
    assert "\n" not in str(err.value)


def test_bool_top_p_and_top_k_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        check_sampling_args(1.0, True, 0)
    with pytest.raises(ValueError, match="top_k"):
        check_sampling_args(1.0, 1.0, True)


def test_smallest_allowed_temperature_samples_like_greedy():
    # At MIN_TEMPERATURE the distribution is finite and concentrated on the argmax (1e-40 used to give NaN).
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0], [100.0, -100.0, 99.0, 0.0]])
    check_sampling_args(MIN_TEMPERATURE, 1.0, 0)
    p = filtered_probs(logits, MIN_TEMPERATURE)
    assert torch.isfinite(p).all() and torch.equal(p.argmax(-1), greedy_token(logits))
    assert torch.equal(sample_token(logits, MIN_TEMPERATURE), greedy_token(logits))
