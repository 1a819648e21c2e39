"""Tree shapes for the hardware: the acceptance replay equals real decoding, the profile's IO, the choice."""
import json

import pytest
import torch

import hass_ext
from hass_ext import draft_io, tree_choice
from hass_ext.tree_choice import accepted_length, choose_tree, measure_acceptance, replay_rounds
from tiny_models import agreeing_draft, tiny_target

SHAPES = [(2, 1, 1), (5, 4, 1), (8, 3, 4), (10, 5, 2), (24, 6, 4)]


@pytest.fixture(scope="module")
def agreeing():
    """A tiny target, prompts, their greedy continuations and a draft trained to agree with them."""
    target = tiny_target("llama", seed=11, vocab=128, hidden=64, heads=4, kv_heads=2, scale=15.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (6,), generator=g) for _ in range(3)]
    vanilla = [hass_ext.generate(p, target=target, max_new_tokens=40).token_ids for p in prompts]
    draft = agreeing_draft(target, [torch.cat([p, torch.tensor(v)]) for p, v in zip(prompts, vanilla)],
                                  steps=200)
    return target, prompts, draft


def test_accepted_length_walks_children_in_order():
    #        0
    #      /   \
    #     1(5)  2(7)
    #     |      |
    #     3(9)  4(8)
    tokens, parents = [0, 5, 7, 9, 8], [-1, 0, 0, 1, 2]
    assert accepted_length(tokens, parents, [7, 8, 1]) == 2
    assert accepted_length(tokens, parents, [5, 9]) == 2
    assert accepted_length(tokens, parents, [5, 8]) == 1
    assert accepted_length(tokens, parents, [6]) == 0
    assert accepted_length(tokens, parents, []) == 0
    assert accepted_length([0], [-1], [3]) == 0


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}-{d}-{k}" for n, d, k in SHAPES])
def test_replay_equals_real_greedy_decoding(agreeing, shape):
    """Replaying the target's greedy continuation gives the accept lengths real decoding gets, round by round."""
    target, prompts, draft = agreeing
    n, d, k = shape
    total = 0
    for p in prompts:
        real = hass_ext.generate(p, target=target, draft=draft, max_new_tokens=40, total_tokens=n, depth=d,
                                 tree_topk=k)
        seq, feats = tree_choice.greedy_continuation(target, p[None], 40)
        assert seq[len(p):].tolist() == real.token_ids
        assert replay_rounds(draft, seq, feats, len(p), shape) == real.accept_lengths
        total += sum(real.accept_lengths)
    if d > 1:
        assert total >= 20, "the draft should accept enough tokens for the comparison to mean something"


def test_profile_saved_loaded_and_dropped_with_a_new_token_map(agreeing, tmp_path):
    target, prompts, draft = agreeing
    profile = measure_acceptance(target, draft, prompts, SHAPES, max_new_tokens=24, progress=False)
    assert profile["prompts"] == 3 and len(profile["shapes"]) == len(SHAPES)
    by_shape = {(s["total_tokens"], s["depth"], s["tree_topk"]): s for s in profile["shapes"]}
    assert by_shape[(2, 1, 1)]["tau"] <= by_shape[(5, 4, 1)]["tau"]  # a deeper chain accepts at least as much
    for s in profile["shapes"]:
        assert s["tau"] == pytest.approx(s["tokens"] / s["rounds"]) and 1.0 <= s["tau"] <= s["depth"] + 1
    # a real run with a profiled shape reproduces its tau exactly (greedy)
    n, d, k = 10, 5, 2
    runs = [hass_ext.generate(p, target=target, draft=draft, max_new_tokens=24, total_tokens=n, depth=d,
                              tree_topk=k) for p in prompts]
    rounds = sum(r.num_rounds for r in runs)
    assert by_shape[(n, d, k)]["rounds"] == rounds
    assert by_shape[(n, d, k)]["tokens"] == sum(r.num_new_tokens - 1 for r in runs)

    draft.tree_profile = profile
    try:
        path = hass_ext.save_draft(draft, tmp_path / "d")
        assert json.loads((tmp_path / "d" / draft_io.PROFILE_NAME).read_text()) == profile
        loaded = hass_ext.load_draft(path, target=target)
        assert loaded.tree_profile == profile
        loaded.set_token_map(torch.arange(64))  # other proposals: the measured acceptance no longer holds
        assert loaded.tree_profile is None
        hass_ext.save_draft(loaded, path)
        assert not (tmp_path / "d" / draft_io.PROFILE_NAME).exists()
    finally:
        draft.tree_profile = None


def test_bad_profile_is_a_clear_error_and_load_draft_ignores_it(agreeing, tmp_path):
    target, _, draft = agreeing
    path = hass_ext.save_draft(draft, tmp_path / "d")
    bad = tmp_path / "d" / draft_io.PROFILE_NAME
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tree_profile.json is not valid JSON"):
        draft_io.load_profile(path)
    with pytest.warns(UserWarning, match="ignoring the tree profile"):  # optional: the draft still loads
        assert hass_ext.load_draft(path, target=target).tree_profile is None
    bad.write_text(json.dumps({"format": 1, "shapes": [{"total_tokens": 8, "depth": 3, "tree_topk": 4,
                                                        "tau": 9.0}]}))
    with pytest.raises(ValueError, match=r"tau 9.0 .* outside \[1, depth \+ 1\]"):
        draft_io.load_profile(path)
    bad.write_text(json.dumps({"format": 1, "shapes": [{"total_tokens": 2, "depth": 3, "tree_topk": 4,
                                                        "tau": 1.5}]}))
    with pytest.raises(ValueError, match=r"tree_topk \(4\) must be <= total_tokens \(2\)"):
        draft_io.load_profile(path)
    with pytest.raises(ValueError, match="at least one calibration prompt"):
        measure_acceptance(target, draft, [], SHAPES)


def _profile(taus):
    return {"format": 1, "shapes": [{"total_tokens": n, "depth": d, "tree_topk": k, "tau": t, "rounds": 1,
                                     "tokens": 1} for (n, d, k), t in taus.items()]}


def test_choice_follows_the_profile_and_the_costs(agreeing):
    """The chosen shape maximises tau / measured round time; fixed depth/top-k restrict it; generate reports it and
    stays lossless."""
    target, prompts, draft = agreeing
    taus = {(5, 4, 1): 4.5, (8, 3, 4): 1.1, (2, 1, 1): 1.05}
    draft.tree_profile = _profile(taus)
    try:
        costs, vanilla = tree_choice.measure_costs(target, draft, list(taus), taus, repeats=1)
        assert vanilla > 0 and all(c > 0 for c in costs.values())
        choice = choose_tree(target, draft)
        assert choice.source == "profile" and choice.expected_tau in taus.values()
        assert (choice.total_tokens, choice.depth, choice.tree_topk) in taus
        assert choice.expected_speedup == pytest.approx(choice.expected_tau * choice.vanilla_step_ms
                                                        / choice.round_ms)
        fixed = choose_tree(target, draft, depth=3)
        assert (fixed.total_tokens, fixed.depth, fixed.tree_topk) == (8, 3, 4)
        r = hass_ext.generate(prompts[0], target=target, draft=draft, max_new_tokens=16)
        assert r.tree is not None and r.tree.source == "profile"
        assert (r.tree.total_tokens, r.tree.depth, r.tree.tree_topk) in taus
        assert r.token_ids == hass_ext.generate(prompts[0], target=target, max_new_tokens=16).token_ids
        assert "expected speedup" in r.tree.describe()
        # a profile whose best shape cannot beat a vanilla step warns that speculation will be slower here
        draft.tree_profile = _profile({(2, 1, 1): 1.01})
        with pytest.warns(UserWarning, match="expected to be slower than vanilla"):
            slow = choose_tree(target, draft)
        assert slow.vanilla_is_faster and "vanilla decoding is faster here" in slow.describe()
        # ... and generate then decodes without the draft: no rounds, the same tokens
        with pytest.warns(UserWarning, match="decodes without the draft"):
            r = hass_ext.generate(prompts[0], target=target, draft=draft, max_new_tokens=16, recalibrate=True)
        assert r.tree.vanilla_is_faster and r.num_rounds == 0
        assert r.token_ids == hass_ext.generate(prompts[0], target=target, max_new_tokens=16).token_ids
        assert not choice.vanilla_is_faster
    finally:
        draft.tree_profile = None


def test_without_a_profile_the_size_comes_from_the_forward_cost(agreeing):
    target, prompts, draft = agreeing
    r = hass_ext.generate(prompts[0], target=target, draft=draft, max_new_tokens=8)
    assert r.tree.source == "forward-cost" and (r.tree.depth, r.tree.tree_topk) == (6, 10)
    r = hass_ext.generate(prompts[0], target=target, draft=draft, max_new_tokens=8, total_tokens=12)
    assert (r.tree.source, r.tree.total_tokens, r.tree.depth, r.tree.tree_topk) == ("given", 12, 6, 10)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        hass_ext.generate(prompts[0], target=target, draft=draft, total_tokens="auto", depth=0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \[.tree_size.\]"):
        hass_ext.generate(prompts[0], target=target, draft=draft, tree_size=3)


def test_cli_tree_profile_then_auto_uses_it(tmp_path, capsys):
    from hass_ext.cli import main

    target = hass_ext.load_target()
    path = hass_ext.save_draft(hass_ext.init_draft(target, seed=0), tmp_path / "draft")
    rc = main(["tree-profile", "--draft", str(path), "--prompts", "gsm8k", "--start", "0", "--num-prompts", "1",
               "--max-new-tokens", "6", "--shapes", "2:1:1", "4:3:1"])
    assert rc == 0, capsys.readouterr().err
    assert "tau" in capsys.readouterr().out
    draft = hass_ext.load_draft(path, target=target)
    assert [(s["total_tokens"], s["depth"], s["tree_topk"]) for s in draft.tree_profile["shapes"]] == \
        [(2, 1, 1), (4, 3, 1)]
    r = hass_ext.generate("2 + 2 =", target=target, draft=draft, max_new_tokens=4)
    assert r.tree.source == "profile" and (r.tree.total_tokens, r.tree.depth) in [(2, 1), (4, 3)]
    assert main(["tree-profile", "--draft", str(path), "--shapes", "4:3"]) == 2
