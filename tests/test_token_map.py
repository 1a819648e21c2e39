"""Reduced draft vocabulary (hot token map, FR-Spec style): the tree drafts from N tokens only, decoding stays
lossless, the map round-trips through checkpoints and SGLang's token-map file, frequencies from prepared data."""
import json
import os

import pytest
import torch

import hass_ext
from hass_ext.draft_io import CheckpointError, load_token_map, save_token_map
from hass_ext.draft import check_token_map
from hass_ext.train.shards import MANIFEST, FORMAT, ShardDataset, pack_examples, shard_name, write_shard
from hass_ext.train.token_map import hot_vocabulary, template_token_ids, token_frequencies
from test_speculative import check_sampling_distribution, sampling_setup
from test_tree import _brute_force_tree, _draft, tree_after_random_context
from tiny_models import agreeing_draft, tiny_target


# ---- the draft tree over a hot vocabulary -------------------------------------------------------------------

@pytest.mark.parametrize("total_tokens,depth,k,n_hot,seed", [(60, 6, 10, 17, 0), (12, 4, 3, 5, 1), (9, 3, 4, 4, 2),
                                                             (30, 5, 2, 39, 3)])
def test_tree_matches_brute_force_over_hot_rows(total_tokens, depth, k, n_hot, seed):
    """draft_tree with a map == the per-path brute force of test_tree on logits whose non-hot columns are -inf
    (so log-probs are normalised over the hot set), and every drafted token is hot."""
    draft = _draft(seed=seed, head_scale=3.0)
    draft.tree_head_dtype = None  # the brute force reads the float32 head
    g = torch.Generator().manual_seed(seed)
    hot = torch.randperm(40, generator=g)[:n_hot]
    draft.set_token_map(hot)
    assert draft.hot_token_ids.tolist() == sorted(hot.tolist()) and draft.tree_vocab_size == n_hot
    tree, _, ctx_ids, ctx_feats = tree_after_random_context(draft, g, 7, total_tokens, depth, k)

    full = draft.logits
    cold = torch.ones(40, dtype=torch.bool)
    cold[hot] = False
    draft.logits = lambda h: full(h).masked_fill(cold, float("-inf"))  # instance override for the brute force
    try:
        tokens, parents = _brute_force_tree(draft, ctx_ids, ctx_feats, 7, total_tokens, depth, min(k, n_hot))
    finally:
        del draft.logits
    assert tree.tokens.tolist() == tokens and tree.parents.tolist() == parents
    assert set(tree.tokens[1:].tolist()) <= set(hot.tolist())


def test_hot_rows_follow_the_head():
    """The cached [N, H] rows are rebuilt when the head is replaced or changed in place, and when the map changes."""
    draft = _draft(seed=0)
    h = torch.randn(3, 32)
    draft.set_token_map([1, 4, 9, 30])
    # default on CPUs: bf16 copies of the float32 head's rows, inputs kept in float32
    with torch.no_grad():
        assert torch.equal(draft.tree_logits(h), hass_ext.ops.small_linear(
            h, draft.lm_head_weight[[1, 4, 9, 30]].bfloat16()))
    torch.testing.assert_close(draft.tree_logits(h), draft.logits(h)[:, [1, 4, 9, 30]], rtol=2e-2, atol=2e-2)
    draft.tree_head_dtype = None  # the head's own rows
    assert torch.allclose(draft.tree_logits(h), draft.logits(h)[:, [1, 4, 9, 30]])
    draft.set_lm_head(torch.randn(40, 32))
    assert torch.allclose(draft.tree_logits(h), draft.logits(h)[:, [1, 4, 9, 30]])
    with torch.no_grad():
        draft.lm_head_weight.mul_(2.0)
    assert torch.allclose(draft.tree_logits(h), draft.logits(h)[:, [1, 4, 9, 30]])
    draft.set_token_map([0, 2])
    assert torch.allclose(draft.tree_logits(h), draft.logits(h)[:, [0, 2]])
    assert draft.tree_token_ids(torch.tensor([1, 0])).tolist() == [2, 0]
    draft.set_token_map(None)
    assert draft.hot_token_ids is None and torch.equal(draft.tree_logits(h), draft.logits(h))
    assert "hot_token_ids" not in draft.state_dict()


# ---- lossless decoding --------------------------------------------------------------------------------------

def test_greedy_lossless_with_hot_vocabulary():
    """Token-identical to vanilla, with hot sets that miss some of the target's greedy tokens (those come out as
    bonus tokens) and a trained draft (so hot tokens get accepted)."""
    target = tiny_target("llama", seed=11, vocab=128, hidden=64, heads=4, kv_heads=2, scale=15.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (6,), generator=g) for _ in range(4)]
    vanilla = [hass_ext.generate(p, target=target, max_new_tokens=48).token_ids for p in prompts]
    draft = agreeing_draft(target, [torch.cat([p, torch.tensor(v)]) for p, v in zip(prompts, vanilla)])
    produced = sorted({t for v in vanilla for t in v})
    assert len(produced) >= 6
    # half of the tokens the target produces, plus unrelated ones
    others = [t for t in range(128) if t not in produced][:20]
    hot_sets = {"half": produced[::2] + others, "one": produced[:1], "none-produced": others}
    for name, hot in hot_sets.items():
        draft.set_token_map(hot)
        missed = sum(t not in hot for v in vanilla for t in v)
        assert missed > 0, "the test needs target tokens outside the hot set"
        accepted = 0
        for p, v in zip(prompts, vanilla):
            for tree in (dict(), dict(total_tokens=8, depth=3, tree_topk=4), dict(total_tokens=5, tree_topk=1)):
                spec = hass_ext.generate(p, target=target, draft=draft, max_new_tokens=48, **tree)
                assert spec.token_ids == v, f"hot set {name}, tree {tree}: output differs from vanilla"
                accepted += sum(spec.accept_lengths)
        if name == "half":
            assert accepted > 0, "hot tokens of a trained draft should be accepted"
        if name == "none-produced":
            assert accepted == 0
    draft.set_token_map(None)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_greedy_lossless_hot_vocabulary_random_draft(family):
    target = tiny_target(family, seed=3, vocab=64, hidden=32, scale=20.0)
    draft = hass_ext.init_draft(target, seed=1)
    draft.set_token_map(range(0, 64, 3))  # fewer hot tokens (22) than ...
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1])]
    for p in prompts:
        v = hass_ext.generate(p, target=target, max_new_tokens=30).token_ids
        for tree in (dict(), dict(total_tokens=30, depth=5, tree_topk=25)):  # ... than tree_topk here
            assert hass_ext.generate(p, target=target, draft=draft, max_new_tokens=30, **tree).token_ids == v


def test_sampling_distribution_with_hot_vocabulary():
    """test_speculative's exact-distribution check, with a draft that drafts from the 12 tokens most frequent in
    its training samples: the target's other tokens can only come from residual draws."""
    target, prompt, draft, samples = sampling_setup()
    counts = torch.bincount(torch.cat([s[len(prompt):] for s in samples]), minlength=32)
    draft.set_token_map(hot_vocabulary(counts, 12))
    sampled = check_sampling_distribution(target, draft, prompt, 1.0, 1.0, 0, n=4000, min_accepted=4000 // 5)
    cold = torch.ones(32, dtype=torch.bool)
    cold[draft.hot_token_ids] = False
    assert float(sampled.sum((1, 2))[cold].sum()) > 0, "no first token outside the hot set was ever produced"


# ---- checkpoints and the SGLang file ------------------------------------------------------------------------

def test_save_load_round_trip_with_and_without_map(tmp_path):
    target = tiny_target("llama", seed=4, vocab=64, scale=20.0)
    draft = hass_ext.init_draft(target, seed=3)
    plain = hass_ext.save_draft(draft, tmp_path / "plain")
    assert not os.path.exists(os.path.join(plain, "token_map.pt"))
    assert hass_ext.load_draft(plain, target=target).hot_token_ids is None

    draft.set_token_map([5, 1, 63, 17, 2])
    path = hass_ext.save_draft(draft, tmp_path / "hot")
    loaded = hass_ext.load_draft(path, target=target)
    assert loaded.hot_token_ids.tolist() == [1, 2, 5, 17, 63] and loaded.hot_token_ids.dtype == torch.int64
    a = hass_ext.generate([1, 2, 3], target=target, draft=draft, max_new_tokens=12)
    b = hass_ext.generate([1, 2, 3], target=target, draft=str(path), max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths
    assert hass_ext.load_draft(path).hot_token_ids.tolist() == [1, 2, 5, 17, 63]  # without a target too

    # SGLang reads the file as torch.tensor(torch.load(path, weights_only=True), dtype=torch.int64)
    raw = torch.load(os.path.join(path, "token_map.pt"), weights_only=True)
    assert isinstance(raw, torch.Tensor) and raw.dim() == 1 and raw.dtype == torch.int64
    assert torch.equal(torch.as_tensor(raw, dtype=torch.int64), draft.hot_token_ids)

    # saving the draft without its map into the same folder removes the stale file
    draft.set_token_map(None)
    hass_ext.save_draft(draft, path)
    assert not os.path.exists(os.path.join(path, "token_map.pt"))
    assert hass_ext.load_draft(path, target=target).hot_token_ids is None


def test_token_map_file_formats(tmp_path):
    f = save_token_map([3, 1, 2], tmp_path / "sub" / "freq_3.pt", vocab_size=10)
    raw = torch.load(f, weights_only=True)
    assert raw.dtype == torch.int64 and raw.tolist() == [1, 2, 3]
    torch.save([7, 4], tmp_path / "list.pt")  # a list of ids, as some published maps are
    assert load_token_map(tmp_path / "list.pt", vocab_size=10).tolist() == [4, 7]


def test_bad_token_maps(tmp_path):
    draft = _draft(seed=0)
    for bad, match in (([], "token map is empty"), ([1, 2, 40], r"must be in \[0, 40\).*got range \[1, 40\]"),
                       ([-1, 3], r"got range \[-1, 3\]"), ([3, 5, 3], "repeated token ids, e.g. 3"),
                       (torch.tensor([[1, 2]]), r"must be 1-D, got shape \(1, 2\)"),
                       (torch.tensor([1.0, 2.0]), "integer token ids, got dtype torch.float32"),
                       ("abc", "token map must be a 1-D sequence")):
        with pytest.raises(ValueError, match=match):
            draft.set_token_map(bad)
    with pytest.raises(ValueError, match="token map is empty"):
        save_token_map([], tmp_path / "x.pt")
    target = tiny_target("llama", seed=4, vocab=64)
    path = hass_ext.save_draft(hass_ext.init_draft(target), tmp_path / "d")
    torch.save(torch.tensor([1, 99]), os.path.join(path, "token_map.pt"))
    with pytest.raises(CheckpointError, match=r"token_map.pt: token map ids must be in \[0, 64\)"):
        hass_ext.load_draft(path, target=target)
    with open(os.path.join(path, "token_map.pt"), "wb") as fh:
        fh.write(b"not a torch file")
    with pytest.raises(CheckpointError, match="is not a token map file"):
        hass_ext.load_draft(path, target=target)


# ---- frequencies and the hot vocabulary ---------------------------------------------------------------------

def _write_folder(folder, examples, vocab_size):
    """A prepare-data style folder from (ids, mask) pairs, split over two shards."""
    os.makedirs(folder, exist_ok=True)
    shards = []
    for k, part in enumerate((examples[: len(examples) // 2], examples[len(examples) // 2:])):
        packed = pack_examples([(i, torch.tensor(ids), torch.zeros(len(ids), 4), torch.tensor(mask))
                                for i, (ids, mask) in enumerate(part)], 4, torch.float32)
        digest = write_shard(os.path.join(folder, shard_name(k)), packed)
        shards.append({"file": shard_name(k), "examples": len(part), "sha256": digest})
    manifest = {"format": FORMAT, "target": "tiny", "hidden_size": 4, "shards": shards}
    if vocab_size is not None:
        manifest["vocab_size"] = vocab_size
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump(manifest, fh)


def test_token_frequencies_hand_made_shards(tmp_path):
    examples = [([1, 2, 3, 3], [0, 1, 1, 1]), ([5, 5, 5], [1, 1, 0]), ([0, 9], [1, 0]), ([7], [0]),
                ([3, 4], [1, 1])]
    _write_folder(tmp_path / "d", examples, vocab_size=12)
    counts = token_frequencies(str(tmp_path / "d"))
    expected = torch.zeros(12, dtype=torch.int64)
    for ids, mask in examples:
        for t, m in zip(ids, mask):
            expected[t] += m
    assert torch.equal(counts, expected) and counts.tolist()[:6] == [1, 0, 1, 3, 1, 2]
    _write_folder(tmp_path / "nov", examples, vocab_size=None)  # no vocab size: up to the largest counted id
    assert torch.equal(token_frequencies(str(tmp_path / "nov")), expected[:6])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 4\)"):
        token_frequencies(str(tmp_path / "d"), vocab_size=4)


def test_token_frequencies_prepared_data(tmp_path):
    """On prepare-data output of a tiny chat target: equal to counting the examples' assistant tokens one by one;
    the hot vocabulary keeps the template's special tokens."""
    from hass_ext.train import prepare_data
    from train_fixtures import make_records, tiny_target as chat_target

    target = chat_target("chatml")
    out = str(tmp_path / "data")
    prepare_data(target, make_records(20, seed=2), out, max_len=96, shard_size=6, progress=False)
    counts = token_frequencies(out)
    V = target.config.vocab_size
    expected = torch.zeros(V, dtype=torch.int64)
    for e in ShardDataset(out, split="all"):
        expected += torch.bincount(e["input_ids"][e["loss_mask"].bool()], minlength=V)
    assert counts.numel() == V and torch.equal(counts, expected) and int(counts.sum()) > 100
    keep = template_token_ids(target)
    vocab = target.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in keep and vocab["<|im_start|>"] in keep
    hot = hot_vocabulary(counts, 40, always=keep)
    assert set(keep) <= set(hot.tolist()) and hot.numel() == 40


def test_hot_vocabulary_order_and_errors():
    counts = torch.tensor([5, 9, 5, 0, 9, 1, 5])
    assert hot_vocabulary(counts, 2).tolist() == [1, 4]
    assert hot_vocabulary(counts, 3).tolist() == [0, 1, 4]          # ties at 5: the lowest id
    assert hot_vocabulary(counts, 4).tolist() == [0, 1, 2, 4]
    assert hot_vocabulary(counts, 3, always=[3]).tolist() == [1, 3, 4]
    assert hot_vocabulary(counts, 3, always=[3, 1]).tolist() == [1, 3, 4]
    assert hot_vocabulary(counts, 7).tolist() == list(range(7))
    with pytest.raises(ValueError, match=r"size must be an int in \[1, 7\]"):
        hot_vocabulary(counts, 8)
    with pytest.raises(ValueError, match=r"size must be an int in \[1, 7\]"):
        hot_vocabulary(counts, 0)
    with pytest.raises(ValueError, match="cannot hold the 3 always-kept tokens"):
        hot_vocabulary(counts, 2, always=[0, 3, 6])
    with pytest.raises(ValueError, match=r"always-kept token ids must be in \[0, 7\)"):
        hot_vocabulary(counts, 3, always=[7])
    with pytest.raises(ValueError, match="non-empty 1-D integer tensor"):
        hot_vocabulary(torch.tensor([0.5, 1.0]), 1)


def test_cli_token_map(tmp_path, monkeypatch, capsys):
    """hass-ext token-map writes DRAFT/token_map.pt (applied by load_draft) and a standalone --out file."""
    import hass_ext.target
    from hass_ext.cli import main

    target = tiny_target("llama", seed=0, vocab=12)
    monkeypatch.setattr(hass_ext.target, "load_target", lambda *a, **k: target)
    _write_folder(tmp_path / "data", [([1, 2, 3, 3], [0, 1, 1, 1]), ([5, 5, 5], [1, 1, 0]), ([3, 4], [1, 1])], 12)
    draft_dir = hass_ext.save_draft(hass_ext.init_draft(target), tmp_path / "draft")
    rc = main(["token-map", "--data", str(tmp_path / "data"), "--size", "3", "--draft", str(draft_dir),
               "--out", str(tmp_path / "sglang.pt")])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["size"] == 3 and report["assistant_tokens"] == 7
    assert abs(report["coverage"] - 6 / 7) < 1e-6  # {2, 3, 5}: 1 + 3 + 2 of 7
    assert hass_ext.load_draft(draft_dir, target=target).hot_token_ids.tolist() == [2, 3, 5]
    assert torch.load(tmp_path / "sglang.pt", weights_only=True).tolist() == [2, 3, 5]
    assert main(["token-map", "--data", str(tmp_path / "data"), "--size", "3"]) == 2
    assert "give --draft" in capsys.readouterr().err
    assert main(["token-map", "--data", str(tmp_path / "data"), "--size", "30", "--out", str(tmp_path / "x.pt")]) == 2
    assert "size must be an int in [1, 12]" in capsys.readouterr().err


def test_check_token_map_sorts():
    assert check_token_map(torch.tensor([4, 0, 2], dtype=torch.int32), 5).tolist() == [0, 2, 4]
    assert check_token_map((3,), None).dtype == torch.int64
