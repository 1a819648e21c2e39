"""Training data: tolerant ShareGPT reading, role policies, template loss masks, shards, resume, corruption."""
import json
import os

import pytest
import torch

from hass_ext.train import CorruptShardError, ShardDataset, collate, prepare_data
from hass_ext.train import conversations as conv
from hass_ext.train import data as data_mod
from hass_ext.train.shards import is_held_out, read_manifest
from train_fixtures import make_records, tiny_target, tiny_tokenizer


def mask_runs(tok, ids, mask):
    """Decoded text of every maximal run of masked tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ---- reading --------------------------------------------------------------------------------------------------

def test_truncated_json_array_drops_only_the_cut_record(tmp_path):
    recs = make_records(6, seed=1)
    text = json.dumps(recs, indent=2)
    cut = text.rfind('"value"') + 20  # inside the last record's last string
    p = tmp_path / "cut.json"
    p.write_text(text[:cut], encoding="utf-8")
    stats = {}
    got = list(conv.iter_json_records(str(p), chunk_chars=97, stats=stats))  # small chunks: records span reads
    assert got == recs[:5]
    assert stats["truncated_tail_chars"] > 0
    p.write_text(text, encoding="utf-8")
    assert list(conv.iter_json_records(str(p), chunk_chars=64)) == recs


def test_jsonl_and_concatenated_objects(tmp_path):
    recs = make_records(4, seed=2)
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    assert list(conv.iter_json_records(str(p), chunk_chars=50)) == recs
    p.write_text("".join(json.dumps(r, indent=1) for r in recs), encoding="utf-8")
    assert list(conv.iter_json_records(str(p))) == recs


def test_malformed_json_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"conversations": []}\n{"conversations": [}\n{"conversations": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: invalid JSON at character \d+"):
        list(conv.iter_json_records(str(p)))
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="is a int, expected a JSON object"):
        list(conv.iter_json_records(str(p)))


def test_bundled_sharegpt_start_and_shuffle():
    recs, desc = conv.load_records("sharegpt", start=2, num=3)
    assert [i for i, _ in recs] == [2, 3, 4] and desc["name"] == "sharegpt"
    assert all(r["conversations"][0]["from"] in ("human", "gpt", "system") for _, r in recs)
    mem = make_records(30)
    a, _ = conv.load_records(mem, num=10, seed=7)
    b, _ = conv.load_records(mem, num=10, seed=7)
    c, _ = conv.load_records(mem, num=10, seed=8)
    assert a == b and a != c and len({i for i, _ in a}) == 10


def test_role_policies():
    rec = {"conversations": [
        {"from": "gpt", "value": "lead"}, {"from": "system", "value": "banner"},
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "chatgpt", "value": "a2"},
        {"from": "human", "value": "q3"}, {"from": "human", "value": "q3 again"}, {"from": "gpt", "value": "a3"}]}
    assert conv.to_messages(rec) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    msgs = conv.to_messages({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                          {"role": "user", "content": "dangling"}]}, system_prompt="Be brief.")
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"}]
    for bad in ({"conversations": [{"from": "human", "value": "only a question"}]}, {"id": 3},
                {"conversations": [{"from": "gpt", "value": "no user"}]}):
        with pytest.raises(conv.SkipConversation):
            conv.to_messages(bad)


# ---- loss mask from the rendered template -------------------------------------------------------------------

MSGS = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital.\n\nIt is also its largest city."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": " Rome, since 1871. "}]


def test_loss_mask_smollm2_template():
    from transformers import AutoTokenizer

    from hass_ext.target import _default_model_dir

    tok = AutoTokenizer.from_pretrained(_default_model_dir())
    ids, mask = conv.encode_conversation(tok, MSGS)
    assert ids == tok.apply_chat_template(MSGS, tokenize=True, return_dict=True)["input_ids"]
    # exactly the assistant contents and their end-of-turn token, nothing of the headers
    assert mask_runs(tok, ids, mask) == [MSGS[1]["content"] + "<|im_end|>", MSGS[3]["content"] + "<|im_end|>"]
    prompt = tok.apply_chat_template(MSGS[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and mask[len(prompt)] == 1


def test_loss_mask_llama3_template():
    tok = tiny_tokenizer("llama3")
    ids, mask = conv.encode_conversation(tok, MSGS)
    assert tok.decode(ids[:1]) == "<|begin_of_text|>"
    # the template trims contents; the mask covers the trimmed content and <|eot_id|>
    assert mask_runs(tok, ids, mask) == [MSGS[1]["content"].strip() + "<|eot_id|>",
                                         MSGS[3]["content"].strip() + "<|eot_id|>"]
    # the header "<|start_header_id|>assistant<|end_header_id|>\n\n" is never trained
    header = tok("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    first = mask.index(1)
    assert ids[first - len(header):first] == header


def test_loss_mask_truncation_and_skip():
    tok = tiny_tokenizer("chatml")
    ids, mask = conv.encode_conversation(tok, MSGS)
    ids8, mask8 = conv.encode_conversation(tok, MSGS, max_len=len(ids) - 5)
    assert ids8 == ids[:-5] and mask8 == mask[:-5]
    rec = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}]}
    with pytest.raises(conv.SkipConversation, match="no_assistant_token_within_max_len"):
        conv.example_from_record(tok, rec, max_len=50)
    rec = {"conversations": [{"from": "human", "value": "say <|im_end|>"}, {"from": "gpt", "value": "ok"}]}
    with pytest.raises(conv.SkipConversation, match="special_token_in_text"):
        conv.example_from_record(tok, rec, max_len=None)


def test_template_that_is_not_prefix_stable_is_refused():
    import copy

    tok = copy.copy(tiny_tokenizer("chatml"))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}[LAST]{% endif %}: "
                         "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        conv.encode_conversation(tok, MSGS)
    # ... unless it marks the assistant text with {% generation %}
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if loop.last %}[LAST]{% endif %}: "
                         "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
                         "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    ids, mask = conv.encode_conversation(tok, MSGS)
    assert [s.strip() for s in mask_runs(tok, ids, mask)] == [MSGS[1]["content"].strip(), MSGS[3]["content"].strip()]


# ---- prepare_data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    return tiny_target("chatml")


def shard_tensors(folder):
    ds = ShardDataset(folder, split="all")
    return [ds[i] for i in range(len(ds))]


def test_prepare_data_contents(tmp_path, target):
    recs = make_records(21, seed=3)
    out = str(tmp_path / "d")
    m = prepare_data(target, recs, out, max_len=120, shard_size=8, batch_tokens=300, hidden_dtype="float32",
                     progress=False)
    assert m["complete"] and len(m["shards"]) == 3 and m["hidden_size"] == 64
    assert [s["conversations"] for s in m["shards"]] == [[0, 8], [8, 16], [16, 21]]
    expect = list(conv.iter_examples(target.tokenizer, enumerate(recs), 120))
    assert any(len(e[1]) == 120 for e in expect) and any(len(e[1]) < 120 for e in expect)
    assert m["num_examples"] == len(expect) == sum(s["examples"] for s in m["shards"])
    assert sum(m["skipped"].values()) == 21 - len(expect)
    got = shard_tensors(out)
    ds = ShardDataset(out, split="all")
    assert [int(v) for sh in ds.shards for v in sh.source_index] == [e[0] for e in expect]
    for g, (idx, ids, mask) in zip(got, expect):
        assert g["input_ids"].tolist() == ids and g["loss_mask"].tolist() == mask
        ref = target.prefill(torch.tensor([ids])).hidden_states[0]  # unbatched, unpadded forward
        torch.testing.assert_close(g["hidden_states"], ref, atol=1e-5, rtol=1e-5)


def test_prepare_data_resumes_without_duplicates(tmp_path, target, monkeypatch):
    recs = make_records(30, seed=4)
    kw = dict(max_len=96, shard_size=6, batch_tokens=200, progress=False)
    ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = prepare_data(target, recs, ref_dir, **kw)
    # 1) a clean stop after two shards, 2) a crash in the middle of the fourth shard, 3) finish
    m = prepare_data(target, recs, dir_, stop_after_shards=2, **kw)
    assert len(m["shards"]) == 2 and not m["complete"]
    calls = {"n": 0}
    real = data_mod.target_features

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "target_features", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(target, recs, dir_, **kw)
    assert len(read_manifest(dir_)["shards"]) == 3
    assert not [f for f in os.listdir(dir_) if f.endswith(".tmp")]
    monkeypatch.setattr(data_mod, "target_features", real)
    m = prepare_data(target, recs, dir_, **kw)
    assert m["complete"]
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["num_examples"] == ref["num_examples"] and m["skipped"] == ref["skipped"]
    # a finished folder is left as it is; other settings are refused
    assert prepare_data(target, recs, dir_, **kw) == m
    with pytest.raises(ValueError, match="different settings.*max_len"):
        prepare_data(target, recs, dir_, **{**kw, "max_len": 97})
    # a different selection of the same source keeps the shards made from the same conversations
    grown_dir = str(tmp_path / "grown")
    small = prepare_data(target, recs[:20], grown_dir, **kw)  # shards of 6, 6, 6, 2 conversations
    assert small["complete"] and len(small["shards"]) == 4
    kept = os.stat(os.path.join(grown_dir, small["shards"][0]["file"])).st_mtime_ns
    grown = prepare_data(target, recs, grown_dir, **kw)
    assert [s["sha256"] for s in grown["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert grown["num_examples"] == ref["num_examples"] and grown["skipped"] == ref["skipped"]
    assert os.stat(os.path.join(grown_dir, small["shards"][0]["file"])).st_mtime_ns == kept
    shrunk = prepare_data(target, recs[:12], grown_dir, **kw)
    assert [s["sha256"] for s in shrunk["shards"]] == [s["sha256"] for s in ref["shards"][:2]]
    assert sorted(f for f in os.listdir(grown_dir) if f.endswith(".safetensors")) == ["shard-00000.safetensors",
                                                                                       "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="different settings.*system_prompt"):
        prepare_data(target, recs, dir_, system_prompt="Be brief.", **kw)
    import copy

    from hass_ext.target import Target

    half = Target(copy.deepcopy(target.model).to(torch.bfloat16), target.tokenizer, target.name)
    with pytest.raises(ValueError, match="different settings.*target_dtype"):
        prepare_data(half, recs, dir_, **kw)


def test_corrupt_shard_is_named(tmp_path, target):
    out = str(tmp_path / "d")
    m = prepare_data(target, make_records(12, seed=5), out, max_len=96, shard_size=6, progress=False)
    victim = os.path.join(out, m["shards"][1]["file"])
    raw = bytearray(open(victim, "rb").read())
    raw[-7] ^= 0xFF  # flip one byte of the data section
    open(victim, "wb").write(bytes(raw))
    with pytest.raises(CorruptShardError, match=r"corrupt shard .*shard-00001\.safetensors: sha256"):
        ShardDataset(out)
    open(victim, "wb").write(bytes(raw[:len(raw) // 2]))  # truncated file, checksum not checked
    with pytest.raises(CorruptShardError, match=r"corrupt shard .*shard-00001\.safetensors"):
        ShardDataset(out, verify_checksum=False)
    os.remove(victim)
    with pytest.raises(CorruptShardError, match=r"missing shard .*shard-00001\.safetensors"):
        ShardDataset(out)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write('{"format": "hass-ext-shards-v1", "shards": [')
    with pytest.raises(CorruptShardError, match="corrupt manifest .*manifest.json"):
        ShardDataset(out)


def test_split_and_collate(tmp_path, target):
    out = str(tmp_path / "d")
    prepare_data(target, make_records(60, seed=6), out, max_len=96, shard_size=16, progress=False)
    full = ShardDataset(out, split="all")
    tr, ev = ShardDataset(out, "train", 0.1), ShardDataset(out, "eval", 0.1)
    assert len(tr) + len(ev) == len(full) and len(ev) == sum(is_held_out(i, 0.1) for i in range(len(full)))
    assert 0 < len(ev) <= len(full) // 10 + 1
    train_ids = [tuple(tr[i]["input_ids"].tolist()) for i in range(len(tr))]
    eval_ids = [tuple(ev[i]["input_ids"].tolist()) for i in range(len(ev))]
    assert sorted(train_ids + eval_ids) == sorted(tuple(full[i]["input_ids"].tolist()) for i in range(len(full)))
    batch = collate([tr[0], tr[1], tr[2]])
    lens = [len(tr[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lens)) and batch["hidden_states"].dtype == torch.float32
    for b, n in enumerate(lens):
        assert batch["attention_mask"][b].sum() == n and not batch["loss_mask"][b, n:].any()
        assert torch.equal(batch["hidden_states"][b, :n], tr[b]["hidden_states"].float())
        assert not batch["hidden_states"][b, n:].any()
    with pytest.raises(ValueError, match="split must be"):
        ShardDataset(out, split="test")


def test_cli_prepare_data_and_train(tmp_path, capsys):
    from hass_ext.train.cli import main

    t = tiny_target("chatml", seed=7)
    tdir = str(tmp_path / "target")
    t.model.save_pretrained(tdir)
    t.tokenizer.save_pretrained(tdir)
    src = tmp_path / "convs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in make_records(24, seed=8)), encoding="utf-8")
    out = str(tmp_path / "data")
    args = ["prepare-data", "--target", tdir, "--conversations", str(src), "--out", out, "--max-len", "96",
            "--shard-size", "10", "--device", "cpu", "--no-progress"]
    assert main(args + ["--stop-after-shards", "1"]) == 0
    assert not read_manifest(out)["complete"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["shards"] == 3 and summary["examples"] == read_manifest(out)["num_examples"]
    assert main(["train", "--data", out, "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
                 "--eval-fraction", "0.1", "--eval-k", "2", "--step-weights", "1", "0.5", "0.25",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and len(summary["acc"]) == 2 and len(summary["loss_per_step"]) == 3
    assert os.path.exists(tmp_path / "run" / "draft" / "model.safetensors")


def test_hass_ext_cli_has_training_subcommands(capsys):
    from hass_ext.cli import build_parser

    for cmd in ("regenerate", "prepare-data", "train"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert f"hass-ext {cmd}" in capsys.readouterr().out


def test_all_unusable_records_are_an_error_not_an_empty_folder(tmp_path, capsys):
    from hass_ext.train.cli import main

    t = tiny_target("chatml", seed=7)
    records = [{"conversations": [{"from": "human", "value": "A question nobody answers?"}]}] * 3 + [{"id": "x"}]
    with pytest.raises(ValueError, match=r"none of the 4 selected conversations gave a training example "
                                         r"\(skipped: no_assistant_turn: 3, no_conversation_list: 1\)"):
        prepare_data(t, records, str(tmp_path / "d"), max_len=96, progress=False)
    tdir = str(tmp_path / "target")
    t.model.save_pretrained(tdir)
    t.tokenizer.save_pretrained(tdir)
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    capsys.readouterr()
    assert main(["prepare-data", "--target", tdir, "--conversations", str(src), "--out", str(tmp_path / "e"),
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m hass_ext.train.cli prepare-data: error: none of the 4") and "\n" not in err
