"""compact_kv against its oracle: random plans, overlapping ranges, stacked and per-layer caches, bad input."""
import pytest
import torch

import hass_ext
from hass_ext.oracles import compact_kv_oracle

DEVICES = ["cpu"] + (["cuda"] if "cuda" in hass_ext.available_devices() else [])


def _random_plan(B, S, m, gen, ragged=True):
    """Accepted-path style plans: increasing source slots at or after dst (overlapping the destinations)."""
    src = torch.full((B, m), -1, dtype=torch.int64)
    dst = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(0 if ragged else m, m + 1, (1,), generator=gen))
        start = int(torch.randint(0, S - m, (1,), generator=gen))
        slots = torch.randperm(S - start, generator=gen)[:n].sort().values + start
        src[b, :n] = slots
        dst[b] = start
    return src, dst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stacked", [False, True])
def test_matches_oracle_random(device, dtype, stacked):
    gen = torch.Generator().manual_seed(1234)
    for trial in range(6):
        B, H, S, D = 1 + trial % 3, 1 + trial % 4, 37, (64, 128, 5)[trial % 3]
        m = 1 + trial * 2
        layers = 3
        if stacked:
            caches = [torch.randn(2 * layers, B, H, S, D, generator=gen).to(dtype)]
        else:
            caches = [torch.randn(B, H, S, D, generator=gen).to(dtype) for _ in range(2 * layers)]
        src, dst = _random_plan(B, S, m, gen)
        expected = [c.clone() for c in caches]
        compact_kv_oracle(expected, src, dst)
        got = [c.to(device) for c in caches]
        hass_ext.ops.compact_kv(got, src.to(device), dst.to(device))
        for e, g in zip(expected, got):
            assert torch.equal(e, g.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_arbitrary_order(device):
    """Sources out of order and overlapping the destination window in both directions."""
    cache = torch.arange(2 * 1 * 2 * 10 * 3, dtype=torch.float32).reshape(2, 1, 2, 10, 3)
    src = torch.tensor([[6, 2, 3, 9, 4]])
    dst = torch.tensor([3])
    expected = cache.clone()
    compact_kv_oracle(expected, src, dst)
    got = cache.clone().to(device)
    hass_ext.ops.compact_kv(got, src.to(device), dst.to(device))
    assert torch.equal(expected, got.cpu())
    # slot 3 now holds old slot 6, slot 4 old slot 2, ... slot 7 old slot 4; the rest unchanged
    assert torch.equal(got.cpu()[..., 3, :], cache[..., 6, :])
    assert torch.equal(got.cpu()[..., 7, :], cache[..., 4, :])
    assert torch.equal(got.cpu()[..., :3, :], cache[..., :3, :])
    assert torch.equal(got.cpu()[..., 8:, :], cache[..., 8:, :])


def test_int_dst_and_1d_src_on_strided_cache():
    """A cache that is a view (non-contiguous batch/head strides, contiguous last dim) is handled in place."""
    big = torch.randn(4, 3, 20, 8)
    view = big[:, :, :, :]  # same storage
    base = big.clone()
    hass_ext.ops.compact_kv(view.transpose(0, 1).transpose(0, 1), [5, 7, 9], 4)
    expected = base.clone()
    compact_kv_oracle(expected, torch.tensor([[5, 7, 9]] * 4), torch.tensor([4] * 4))
    assert torch.equal(big, expected)


def test_empty_plan_changes_nothing():
    cache = torch.randn(2, 2, 6, 4)
    before = cache.clone()
    hass_ext.ops.compact_kv(cache, torch.full((2, 3), -1), torch.tensor([1, 2]))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(src=[[0, 12]], dst=0), "outside"),
    (dict(src=[[2, 3]], dst=9), "outside"),
    (dict(src=[[2, -1, 3]], dst=0), "outside"),
    (dict(src=[[2, 3], [4, 5]], dst=0), "batch"),
    (dict(src=[[1.5, 2.0]], dst=0), "dtype"),
])
def test_bad_input(kwargs, match):
    cache = torch.randn(1, 2, 10, 4)
    before = cache.clone()
    src = torch.tensor(kwargs["src"])
    with pytest.raises((ValueError, RuntimeError), match=match):
        hass_ext.ops.compact_kv(cache, src, kwargs["dst"])
    assert torch.equal(cache, before), "a rejected plan must not modify the cache"


def test_slot_lists_must_hold_integers():
    cache = torch.randn(1, 2, 10, 4)
    before = cache.clone()
    with pytest.raises(ValueError, match="src_slots must hold integer indices, got torch.float32 values"):
        hass_ext.ops.compact_kv(cache, [1.5, 2.0], 0)  # used to be truncated to [1, 2]
    with pytest.raises(ValueError, match="dst_start must be an int or an int64 tensor, got True"):
        hass_ext.ops.compact_kv(cache, [1, 2], True)
    assert torch.equal(cache, before)
    hass_ext.ops.compact_kv(cache, [3, 4], 1)  # a list of ints is fine
    assert torch.equal(cache[:, :, 1:3], before[:, :, 3:5])


def test_bad_cache_arguments():
    with pytest.raises(ValueError, match="empty"):
        hass_ext.ops.compact_kv([], torch.tensor([[0]]), 0)
    with pytest.raises(ValueError, match="dims"):
        hass_ext.ops.compact_kv(torch.randn(2, 10, 4), torch.tensor([[0]]), 0)
    with pytest.raises(ValueError, match="floating"):
        hass_ext.ops.compact_kv(torch.zeros(1, 1, 4, 4, dtype=torch.int32), torch.tensor([[0]]), 0)
    with pytest.raises(ValueError, match="contiguous"):
        hass_ext.ops.compact_kv(torch.randn(1, 1, 4, 4).transpose(-1, -2), torch.tensor([[0]]), 0)


def test_registered_as_custom_op_with_fake():
    cache = torch.randn(1, 1, 6, 4, device="meta")
    torch.ops.hass.compact_kv([cache], torch.zeros(1, 2, dtype=torch.int64, device="meta"),
                              torch.zeros(1, dtype=torch.int64, device="meta"))
