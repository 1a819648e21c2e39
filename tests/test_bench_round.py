"""bench/bench_round.py on the tiny shape: the result files, the step breakdown, and that the timed rounds are
real, lossless rounds (their tokens are greedy decoding's)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"draft_tree", "verify_forward", "verify_tree", "compact_kv", "draft_extend", "rest"}


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("attn", ["hass_tree", "sdpa"])
def test_round_breakdown_and_lossless(tmp_path, attn):
    # vocabulary 16: the random draft's top-10 children often hold the target's argmax, so the round accepts
    # draft tokens and compact_kv moves entries
    run(os.path.join("bench", "bench_round.py"), "--tiny", "--device", "cpu", "--vocab", "16", "--repeats", "4",
        "--attn", attn, "--out-dir", str(tmp_path))
    assert [p.name for p in tmp_path.glob("round_*.json")] == [f"round_cpu_{attn}-quick.json"]
    doc = json.loads((tmp_path / f"round_cpu_{attn}-quick.json").read_text())
    assert doc["config"]["attention"] == attn
    s = doc["summary"]
    assert set(s["phases_s"]) == STEPS
    assert all(v > 0 for k, v in s["phases_s"].items() if k != "rest") and s["phases_s"]["rest"] >= 0
    assert abs(sum(s["phases_s"].values()) - s["round_s"]) <= 1e-9 + 1e-6 * s["round_s"]
    assert s["phases_s"]["rest"] < 0.25 * s["round_s"], "the timed steps should cover the round"
    assert s["vanilla_step_s"] > 0 and abs(s["break_even_tau"] - s["round_s"] / s["vanilla_step_s"]) < 1e-9
    assert s["round_matches_greedy"] and s["rounds_identical"]
    assert s["accepted_draft_tokens"] >= 1 and s["tokens_per_round"] == s["accepted_draft_tokens"] + 1
    steps = [r["step"] for r in doc["rows"]]
    assert steps[0] == "vanilla decode step" and steps[-1] == "round: total"
    assert {st.removeprefix("round: ") for st in steps[1:-1]} == STEPS
    assert doc["config"]["total_tokens"] == 60 and doc["config"]["depth"] == 6 and doc["config"]["tree_topk"] == 10
    assert "Break-even tau" in (tmp_path / f"round_cpu_{attn}-quick.md").read_text()


def test_run_all_runs_it_quick(tmp_path):
    proc = run(os.path.join("bench", "run_all.py"), "--quick", "--only", "bench_round", "--out-dir", str(tmp_path))
    assert "| bench_round | ok |" in proc.stdout
    results = sorted(tmp_path.glob("round_*-quick.json"))  # round_cpu_<attn> or round_<GPU name>_<attn>
    assert {p.name.rsplit("_", 1)[-1] for p in results} == {"sdpa-quick.json", "tree-quick.json"}  # both by default
    for result in results:
        s = json.loads(result.read_text())["summary"]
        assert s["round_s"] > 0 and s["vanilla_step_s"] > 0 and s["round_matches_greedy"]
