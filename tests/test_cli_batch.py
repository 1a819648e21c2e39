"""hass-ext generate --prompts-file: a JSONL file of prompts decoded in batches, one JSON line per prompt in input
order; bad lines named by their line number, before any model is loaded where the file alone shows it."""
import json

import pytest
import torch

import hass_ext
from hass_ext import cli
from tiny_models import tiny_target

FIELDS = ["index", "text", "token_ids", "stop_reason", "num_new_tokens", "num_rounds", "mean_accept_length",
          "elapsed"]


@pytest.fixture(scope="module")
def tiny():
    """A tiny random target (token-id prompts only: its stub tokenizer cannot encode text) and a random draft."""
    target = tiny_target("llama", seed=4, vocab=64, scale=20.0)
    return target, hass_ext.init_draft(target, seed=3)


@pytest.fixture
def use_tiny(monkeypatch, tiny):
    monkeypatch.setattr(cli, "_load", lambda args: tiny[0])
    return tiny


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(args):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", refuse)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def read_records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17], [18]]


def test_batches_keep_input_order_and_match_lone_greedy_runs(tmp_path, capsys, use_tiny):
    target, _ = use_tiny
    lines = [{"input_ids": PROMPTS[0]}, {"input_ids": PROMPTS[1], "max_new_tokens": 3}, "",
             {"input_ids": PROMPTS[2]}, {"input_ids": PROMPTS[3], "max_new_tokens": 9}, {"input_ids": PROMPTS[4]}]
    path = write_lines(tmp_path / "p.jsonl", lines)
    assert cli.main(["generate", "--prompts-file", path, "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    records = read_records(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]  # the blank line is skipped, not a prompt
    assert all(list(r) == FIELDS for r in records)
    for r, prompt, m in zip(records, PROMPTS, [6, 3, 6, 9, 6]):
        lone = hass_ext.generate(prompt, target=target, max_new_tokens=m)
        assert r["token_ids"] == lone.token_ids and r["text"] == lone.text
        assert r["num_new_tokens"] == len(r["token_ids"]) == m and r["stop_reason"] == "length"
        assert r["num_rounds"] == 0 and r["mean_accept_length"] == 1.0 and r["elapsed"] > 0
    assert "5 prompts in batches of 2: 30 tokens in" in err and "tokens/s" in err


def test_speculative_batches_to_an_output_file(tmp_path, capsys, use_tiny):
    target, draft = use_tiny
    draft_path = hass_ext.save_draft(draft, tmp_path / "draft")
    path = write_lines(tmp_path / "p.jsonl", [{"input_ids": p} for p in PROMPTS])
    out_path = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--prompts-file", path, "--batch-size", "3", "--max-new-tokens", "7", "--draft",
                   str(draft_path), "--total-tokens", "6", "--depth", "3", "--tree-topk", "2", "--output",
                   str(out_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == ""  # the lines go to --output only
    records = read_records(out_path.read_text())
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for r, prompt in zip(records, PROMPTS):
        assert r["token_ids"] == hass_ext.generate(prompt, target=target, max_new_tokens=7).token_ids
        assert r["num_rounds"] >= 1 and r["mean_accept_length"] >= 1.0
    assert "batch of 3: tree 6 nodes, depth 3, top-k 2 (given)" in err
    assert "batch of 2: tree 6 nodes" in err and f"written: {out_path}" in err


def test_seeds_per_line_and_from_one_seed(tmp_path, capsys, use_tiny):
    """One --seed gives the i-th prompt of the file seed + i (whatever its batch); a line's own seed wins."""
    target, _ = use_tiny
    lines = [{"input_ids": PROMPTS[0]}, {"input_ids": PROMPTS[1], "seed": 100}, {"input_ids": PROMPTS[2]}]
    path = write_lines(tmp_path / "p.jsonl", lines)
    argv = ["generate", "--prompts-file", path, "--max-new-tokens", "8", "--temperature", "1", "--seed", "5"]
    for batch in ("1", "2"):
        assert cli.main(argv + ["--batch-size", batch]) == 0
        records = read_records(capsys.readouterr().out)
        for r, prompt, seed in zip(records, PROMPTS, [5, 100, 7]):
            lone = hass_ext.generate(prompt, target=target, max_new_tokens=8, temperature=1.0, seed=seed)
            assert r["token_ids"] == lone.token_ids, (batch, r["index"])


def test_prompts_from_standard_input(monkeypatch, capsys, use_tiny):
    import io

    target, _ = use_tiny
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"input_ids": PROMPTS[0]}) + "\n"))
    assert cli.main(["generate", "--prompts-file", "-", "--max-new-tokens", "4"]) == 0
    (record,) = read_records(capsys.readouterr().out)
    assert record["token_ids"] == hass_ext.generate(PROMPTS[0], target=target, max_new_tokens=4).token_ids


@pytest.mark.parametrize("lines, message", [
    ([{"input_ids": [1]}, "{not json"], "p.jsonl:2: not valid JSON"),
    ([{"input_ids": [1]}, "", "[1, 2]"], "p.jsonl:3: a line must be a JSON object or string, got list"),
    ([{"text": "hi"}], "p.jsonl:1: unknown key(s) ['text']"),
    ([{"prompt": "hi", "max_tokens": 4}], "p.jsonl:1: unknown key(s) ['max_tokens']"),
    ([{"max_new_tokens": 4}], "p.jsonl:1: a line needs exactly one of prompt, messages, input_ids, got none"),
    ([{"prompt": "hi", "input_ids": [1]}], "p.jsonl:1: a line needs exactly one of"),
    ([{"prompt": ["hi"]}], "p.jsonl:1: 'prompt' must be a string, got list"),
    ([{"messages": ["hi"]}], "p.jsonl:1: 'messages' must be a list of"),
    ([{"input_ids": [1, "2"]}], "p.jsonl:1: 'input_ids' must be a list of ints"),
    ([{"prompt": "hi", "max_new_tokens": 0}], "p.jsonl:1: max_new_tokens must be an int > 0, got 0"),
    ([{"prompt": "hi", "seed": 1.5}], "p.jsonl:1: seed must be an int or null, got 1.5"),
    (["", "  "], "no prompts (the file is empty)"),
])
def test_bad_lines_are_named_before_loading(tmp_path, capsys, nothing_loads, lines, message):
    path = write_lines(tmp_path / "p.jsonl", lines)
    assert cli.main(["generate", "--prompts-file", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hass-ext generate: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--prompts-file", "P"], "either a prompt or --prompts-file, not both"),
    (["generate"], "give a prompt, - to read it from standard input, or --prompts-file"),
    (["generate", "hi", "--batch-size", "2"], "--batch-size applies to --prompts-file"),
    (["generate", "hi", "--output", "o.jsonl"], "--output applies to --prompts-file"),
    (["generate", "--prompts-file", "P", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["generate", "--prompts-file", "P", "--stats"], "--stats applies to a single prompt"),
    (["generate", "--prompts-file", "/nonexistent/p.jsonl"], "--prompts-file /nonexistent/p.jsonl: no such file"),
    (["generate", "--prompts-file", "P", "--output", "/nonexistent/o.jsonl"], "the folder /nonexistent does not"),
    (["generate", "--prompts-file", "P", "--max-new-tokens", "0"], "max_new_tokens must be an int > 0"),
])
def test_bad_arguments_before_loading(tmp_path, monkeypatch, capsys, nothing_loads, argv, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "P", [{"prompt": "hi"}])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hass-ext generate: error: ") and message in err and err.count("\n") == 1


def test_a_line_the_target_refuses_is_named_and_nothing_is_written(tmp_path, capsys, use_tiny):
    # the stub tokenizer has no chat template; token ids outside the vocabulary
    for bad, message in (({"messages": [{"role": "user", "content": "hi"}]}, "has no chat template"),
                         ({"input_ids": [1, 999]}, "token ids must be in [0, 64)")):
        path = write_lines(tmp_path / "p.jsonl", [{"input_ids": [1, 2]}, "", bad])
        out_path = tmp_path / "out.jsonl"
        assert cli.main(["generate", "--prompts-file", path, "--output", str(out_path)]) == 2
        err = capsys.readouterr().err
        assert "p.jsonl:3: " in err and message in err
        assert not out_path.exists()


def test_text_chat_and_bare_string_lines_on_the_default_target(tmp_path, capsys):
    """The real default target (SmolLM2-135M) once: text, chat messages and a bare string, 8 tokens each."""
    target = hass_ext.load_target(dtype=torch.float32, device="cpu")
    messages = [{"role": "user", "content": "Name a colour."}]
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?"}, {"messages": messages},
                                              json.dumps("Say hi.")])
    assert cli.main(["generate", "--prompts-file", path, "--batch-size", "2", "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0
    records = read_records(capsys.readouterr().out)
    for r, prompt in zip(records, ["What is 2 + 2?", messages, "Say hi."]):
        lone = hass_ext.generate(prompt, target=target, max_new_tokens=8)
        assert r["token_ids"] == lone.token_ids and r["text"] == lone.text
    assert [r["index"] for r in records] == [0, 1, 2]
