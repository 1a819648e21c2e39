"""The evaluation harness on a tiny run: vanilla only (drafts are covered where speculative decoding is tested)."""
import json

import pytest

import hass_ext
from hass_ext.speed_eval import evaluate, load_questions, summarize, write_results


def test_load_questions_packaged_and_errors(tmp_path):
    for name in ("mt_bench", "humaneval", "gsm8k"):
        assert len(load_questions(name)) == 80
    assert len(load_questions("mt_bench")[0]["turns"]) == 2
    with pytest.raises(FileNotFoundError, match="no question file"):
        load_questions("no_such_set")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_questions(str(bad))


def test_summarize_reference_and_weighted_tau():
    rows = {"vanilla": [{"tokens": 10, "seconds": 1.0, "accept_lengths": []},
                        {"tokens": 10, "seconds": 2.0, "accept_lengths": []}],
            "d": [{"tokens": 10, "seconds": 0.5, "accept_lengths": [1, 3]},
                  {"tokens": 10, "seconds": 1.0, "accept_lengths": [0]}]}
    s = summarize(rows)
    assert s["d"]["tau"] == pytest.approx(((2 + 1) + (0 + 1)) / 2)           # mean of per-question means
    assert s["d"]["tau_token_weighted"] == pytest.approx((2 + 4 + 1) / 3)    # all tokens / all rounds
    assert s["d"]["speedup"] == pytest.approx(((20 + 10) / 2) / ((10 + 5) / 2))
    assert s["d"]["accept_histogram"] == {"0": 1, "1": 1, "3": 1}
    assert "tau" not in s["vanilla"] and s["vanilla"]["speedup"] == pytest.approx(1.0)
    assert "identical_to_vanilla" not in s["d"]  # no tokens recorded, not greedy


def test_summarize_counts_greedy_questions_identical_to_vanilla():
    row = lambda ids: {"tokens": 2, "seconds": 1.0, "accept_lengths": [1], "token_ids": ids}  # noqa: E731
    rows = {"vanilla": [row([[1, 2]]), row([[3, 4]])], "d": [row([[1, 2]]), row([[3, 5]])]}
    assert summarize(rows, greedy=True)["d"]["identical_to_vanilla"] == 1
    assert "identical_to_vanilla" not in summarize(rows, greedy=False)["d"]  # sampling: tokens differ by design


def test_vanilla_eval_writes_results(tmp_path):
    target = hass_ext.load_target()
    results = evaluate(target, {}, datasets=["gsm8k"], temperatures=[0.0], num_questions=2, max_new_tokens=8,
                       turns=1, warmup=0, progress=False)
    entry = results["gsm8k@T=0"]
    assert entry["methods"]["vanilla"]["questions"] == 2
    assert entry["methods"]["vanilla"]["new_tokens"] <= 16
    paths = write_results(results, str(tmp_path), "tiny", "hass-ext eval --datasets gsm8k", {"n": 2})
    doc = json.loads(open(paths["json"]).read())
    assert doc["command"].startswith("hass-ext eval") and doc["machine"]["torch"]
    assert "| gsm8k | 0 | vanilla |" in open(paths["md"]).read()


def test_cli_eval_with_a_draft_and_tree_options(tmp_path, capsys):
    from hass_ext.cli import main

    target = hass_ext.load_target()
    path = hass_ext.save_draft(hass_ext.init_draft(target, seed=0), tmp_path / "draft")
    rc = main(["eval", "--draft", f"rnd={path}", "--datasets", "gsm8k", "--temperatures", "0", "1", "--num-questions", "2",
               "--turns", "1", "--max-new-tokens", "8", "--total-tokens", "4", "--depth", "2", "--tree-topk", "2",
               "--out-dir", str(tmp_path / "out"), "--name", "t"])
    assert rc == 0, capsys.readouterr().err
    (json_path,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".json"]
    doc = json.loads(json_path.read_text())
    assert doc["settings"]["total_tokens"] == 4 and doc["settings"]["depth"] == 2
    assert doc["command"].startswith("hass-ext eval --draft rnd=") and "--tree-topk 2" in doc["command"]
    methods = doc["results"]["gsm8k@T=0"]["methods"]
    assert set(methods) == {"vanilla", "rnd"}
    assert methods["rnd"]["questions"] == 2 and methods["rnd"]["tau"] >= 1.0
    # greedy speculative decoding is lossless: the same number of new tokens as vanilla
    assert methods["rnd"]["new_tokens"] == methods["vanilla"]["new_tokens"]
    assert methods["rnd"]["identical_to_vanilla"] == 2
    sampled = doc["results"]["gsm8k@T=1"]["methods"]
    assert sampled["rnd"]["questions"] == 2 and "identical_to_vanilla" not in sampled["rnd"]
    pngs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert pngs and all((tmp_path / "out" / p).stat().st_size > 1000 for p in pngs), pngs
    assert methods["rnd"]["tree"]["total_tokens"] == 4 and methods["rnd"]["tree"]["source"] == "given"
