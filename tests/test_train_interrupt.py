"""A training run is never lost: Ctrl-C / SIGTERM write a checkpoint that --resume continues bit for bit, a kill
during a checkpoint write leaves no temporary behind once the run is continued, and --resume / --out misuse is
refused with a message. Each run is a real `train` process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hass_ext.train import prepare_data
from train_fixtures import make_records, tiny_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

# Runs `hass_ext.train.cli train` in this process after optional test hooks: SLOW_STEPS sleeps after every step
# (so a signal surely lands mid-run; the sleep changes no result), KILL_AT_SAVE=N kills the process (SIGKILL) in
# the middle of its N-th checkpoint write, after the draft and before the optimizer state.
RUNNER = """
import os, sys, time
from hass_ext.train import trainer
if os.environ.get("SLOW_STEPS"):
    real_step = trainer.Trainer.train_step
    def slow_step(self):
        out = real_step(self)
        time.sleep(float(os.environ["SLOW_STEPS"]))
        return out
    trainer.Trainer.train_step = slow_step
if os.environ.get("KILL_AT_SAVE"):
    import signal
    real_save, calls = trainer.save_draft, []
    def save_then_die(draft, path, *a, **k):
        out = real_save(draft, path, *a, **k)
        calls.append(path)
        if len(calls) == int(os.environ["KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    trainer.save_draft = save_then_die
from hass_ext.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    target = tiny_target("chatml", seed=1, head_scale=20.0)
    tdir = str(root / "target")
    target.model.save_pretrained(tdir)
    target.tokenizer.save_pretrained(tdir)
    data = str(root / "data")
    prepare_data(target, make_records(48, seed=11), data, max_len=96, shard_size=16, progress=False)
    return root, tdir, data


def train_cmd(setup, out, *extra):
    _, tdir, data = setup
    return ["train", "--data", data, "--out", str(out), "--target", tdir, "--max-steps", str(STEPS),
            "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2", "--eval-fraction", "0.1", "--eval-k", "2",
            "--eval-max-examples", "2", "--log-every", "1", "--no-progress", *extra]


def env(**hooks):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **hooks}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(args, **hooks):
    return subprocess.run([sys.executable, "-c", RUNNER, *args], env=env(**hooks), capture_output=True, text=True,
                          timeout=600)


def train_steps(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def weights(out):
    return load_file(os.path.join(out, "draft", "model.safetensors"))


def leftovers(out):
    found = []
    for folder in (out / "checkpoints", out, out / "draft"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(".")]
    return found


@pytest.fixture(scope="module")
def straight(setup):
    out = setup[0] / "straight"
    proc = run(train_cmd(setup, out, "--save-every", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_run(out, straight):
    steps = train_steps(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # every step once, none twice
    assert [r["loss"] for r in steps] == [r["loss"] for r in train_steps(straight)]
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not leftovers(out)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_that_resume_continues_bit_for_bit(setup, straight, sig):
    out = setup[0] / sig
    # --save-every 0: the only checkpoint is the one the signal writes
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *train_cmd(setup, out, "--save-every", "0")],
                            env=env(SLOW_STEPS="0.4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-3000:]
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert 3 <= latest["step"] < STEPS
    assert f"stopped by {sig} at step {latest['step']}" in stderr and "--resume" in stderr
    assert not (out / "draft").exists() and not leftovers(out)

    if sig == "SIGINT":  # the same command without --resume is refused (once is enough)
        again = run(train_cmd(setup, out, "--save-every", "0"))
        assert again.returncode == 2 and "already holds a training run" in again.stderr and "--resume" in again.stderr

    resumed = run(train_cmd(setup, out, "--save-every", "0", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == STEPS
    assert_same_run(out, straight)


def test_kill_during_a_checkpoint_write_leaves_no_temporary(setup, straight):
    out = setup[0] / "killed"
    proc = run(train_cmd(setup, out, "--save-every", "3"), KILL_AT_SAVE="2")  # dies inside the step-6 write
    assert proc.returncode == -signal.SIGKILL
    ck = out / "checkpoints"
    assert json.loads((ck / "latest.json").read_text())["step"] == 3
    assert any(p.name.startswith(".step-00000006.") for p in ck.iterdir())  # the half-written checkpoint
    resumed = run(train_cmd(setup, out, "--save-every", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight)  # includes: no temporary left anywhere
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step-00000009", "step-00000012"]


def test_resume_without_a_checkpoint_is_refused(setup, tmp_path):
    proc = run(train_cmd(setup, tmp_path / "new", "--resume"))
    assert proc.returncode == 2
    assert "nothing to resume" in proc.stderr and "without --resume" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "new" / "log.jsonl").exists()
