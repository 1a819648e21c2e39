"""Self-distillation data (hass_ext.train.regenerate): batched greedy answers equal one-by-one greedy decoding,
the file resumes without duplicates or losses, and prepare_data reads it."""
import json

import pytest
import torch

from hass_ext.train import prepare_data
from hass_ext.train.regenerate import regenerate
from train_fixtures import make_records, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target("chatml", head_scale=8.0)  # peaky distributions: no near-ties between greedy candidates


def greedy_alone(target, text, n):
    """Greedy answer tokens of one prompt, unbatched and unpadded, stopping at end of turn."""
    ids = target.encode([{"role": "user", "content": text}])
    eos = target.eos_token_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(target.model(ids).logits[0, -1].argmax())
            if tok in eos:
                break
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_batched_answers_are_the_targets_greedy_answers(tmp_path, target):
    recs = make_records(12, seed=5)
    recs.append(dict(recs[0]))  # a repeated first user turn is answered once
    out = str(tmp_path / "a.jsonl")
    counts = regenerate(target, recs, out, max_new_tokens=10, batch_size=4, progress=False)
    lines = read(out)
    assert counts["answered"] == len(lines) == 12 and counts["skipped"] == {"duplicate_prompt": 1}
    assert sorted(r["source_index"] for r in lines) == list(range(12))
    for r in lines:
        human, gpt = r["conversations"]
        first_user = next(t for t in recs[r["source_index"]]["conversations"] if t["from"] == "human")
        assert human == {"from": "human", "value": first_user["value"]}
        want = greedy_alone(target, human["value"], 10)
        assert gpt["value"] == target.tokenizer.decode(want, skip_special_tokens=True).strip()
        assert r["finished"] == (len(want) < 10)


def test_resume_after_interruption(tmp_path, target):
    recs = make_records(10, seed=6)
    kw = dict(max_new_tokens=6, batch_size=3, progress=False)
    ref = str(tmp_path / "ref.jsonl")
    regenerate(target, recs, ref, **kw)
    run = str(tmp_path / "run.jsonl")
    first = regenerate(target, recs, run, stop_after_batches=2, **kw)
    assert first["answered"] == 6
    with open(run, "a", encoding="utf-8") as f:
        f.write('{"source_index": 9, "finis')  # a write cut off by a crash
    second = regenerate(target, recs, run, **kw)
    assert second["already_done"] == 6 and second["answered"] == 4
    key = lambda r: r["source_index"]  # noqa: E731
    assert sorted(read(run), key=key) == sorted(read(ref), key=key)
    assert regenerate(target, recs, run, **kw)["answered"] == 0  # finished: nothing to do


def test_limits_and_bad_files(tmp_path, target):
    recs = make_records(6, seed=7)
    out = str(tmp_path / "short.jsonl")
    counts = regenerate(target, recs, out, max_prompt_tokens=20, max_new_tokens=4, progress=False)
    assert counts["skipped"].get("prompt_too_long", 0) > 0
    assert counts["answered"] + counts["skipped"]["prompt_too_long"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl, line 1"):
        regenerate(target, recs, str(bad), progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        regenerate(target, recs, out, max_new_tokens=0, progress=False)


def test_prepare_data_reads_regenerated_file(tmp_path, target):
    out = str(tmp_path / "a.jsonl")
    regenerate(target, make_records(8, seed=8), out, max_new_tokens=8, batch_size=8, progress=False)
    m = prepare_data(target, out, str(tmp_path / "d"), max_len=200, shard_size=4, hidden_dtype="float32",
                     progress=False)
    assert m["complete"] and m["num_examples"] == 8 and sum(s["loss_tokens"] for s in m["shards"]) >= 8


def test_cli_regenerate(tmp_path, capsys, monkeypatch, target):
    from hass_ext.train import cli

    monkeypatch.setattr("hass_ext.target.load_target", lambda *a, **k: target)
    src = tmp_path / "recs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in make_records(5, seed=9)), encoding="utf-8")
    out = str(tmp_path / "a.jsonl")
    assert cli.main(["regenerate", "--conversations", str(src), "--out", out, "--max-new-tokens", "4",
                     "--batch-size", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["answered"] == len(read(out)) == 5
