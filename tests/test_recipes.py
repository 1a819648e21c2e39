"""The training recipes in python/ agree with each other: every training stage has its data part, its export
notes and its command-line choice, and the self-distillation stages answer new prompts."""
import importlib.util
import os
import sys

import pytest

PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def _load(name):
    sys.path.insert(0, PYTHON_DIR)  # export_drafts imports regenerate_sharegpt as the scripts do
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(PYTHON_DIR, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(PYTHON_DIR)


def test_every_stage_has_data_notes_and_cli_choice(capsys):
    train, export, prepare = _load("train_drafts"), _load("export_drafts"), _load("prepare_sharegpt")
    assert set(train.STAGES) == set(export.STAGE_NOTES) == set(prepare.PARTS)
    for mod in (train, export):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        assert "{" + ",".join(str(s) for s in sorted(train.STAGES)) + "}" in capsys.readouterr().out
    for stage in train.STAGES:
        if stage > 1:  # later stages continue the shipped drafts
            assert all(os.path.isdir(p) for p in train.SHIPPED_DRAFTS.values())


def test_self_distillation_stages_answer_new_prompts():
    regen, prepare, train = _load("regenerate_sharegpt"), _load("prepare_sharegpt"), _load("train_drafts")
    end = prepare.PARTS[2]["start"] + prepare.PARTS[2]["num_conversations"]
    assert set(regen.STAGES) == {s for s in train.STAGES if s >= 3}
    for stage in sorted(regen.STAGES):  # new prompts, not ones an earlier stage trained on or answered
        assert regen.STAGES[stage]["start"] >= end
        end = regen.STAGES[stage]["start"] + regen.STAGES[stage]["num_conversations"]
        with pytest.raises(SystemExit):
            prepare.main(["--out", "unused", "--part", str(stage)])  # these parts need their conversations file
    with pytest.raises(SystemExit):
        prepare.main(["--out", "unused", "--part", "2", "--conversations", "answers.jsonl"])


def test_hass_variant_flags_reach_the_hass_run_only(monkeypatch):
    train = _load("train_drafts")
    seen = {}

    class FakeTrainer:  # records the config instead of training
        rank, step = 0, 0

        def __init__(self, cfg):
            seen[cfg.mode] = cfg

        def train(self, resume):
            return {}

    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    train.main(["--data", "D", "--out", "R", "--stage", "4", "--hass-attention", "reference",
                "--hass-topk-w", "0", "--hass-step-weights", "1", "0.5", "0.25"])
    h, e = seen["hass"], seen["eagle"]
    assert (h.attention, h.topk_w, h.step_weights) == ("reference", 0.0, [1.0, 0.5, 0.25])
    assert (e.attention, e.topk_w, e.step_weights) == ("proper", 0.0, [1.0])
    assert h.init_from == train.SHIPPED_DRAFTS["hass"] and e.init_from == train.SHIPPED_DRAFTS["eagle"]
    assert h.lr == train.STAGES[4]["lr"] and h.out_dir == os.path.join("R", "hass")
    train.main(["--data", "D", "--out", "R", "--stage", "4", "--mode", "hass", "--init-from", "OLD"])
    assert seen["hass"].init_from == "OLD" and seen["hass"].attention == "proper" and seen["hass"].topk_w == 1.0
    assert seen["hass"].align_steps == 3
    train.main(["--data", "D", "--out", "R", "--stage", "4", "--mode", "hass", "--hass-align-steps", "1"])
    assert seen["hass"].align_steps == 1 and seen["hass"].step_weights == [1.0] and seen["hass"].topk_w == 1.0
    with pytest.raises(SystemExit):  # one directory cannot start both drafts
        train.main(["--data", "D", "--out", "R", "--stage", "4", "--init-from", "OLD"])
    with pytest.raises(SystemExit):  # stage 1 starts from scratch
        train.main(["--data", "D", "--out", "R", "--mode", "hass", "--init-from", "OLD"])
