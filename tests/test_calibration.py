"""Round-cost calibration: cached on disk per key, bad caches ignored with a warning, reused by a later process so
that a seeded sampled generation gives the same text on every run."""
import json
import os
import subprocess
import sys

import pytest

from hass_ext import calibration
from hass_ext.calibration import calibrated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = {"kind": "test", "device": "cpu-x", "target": {"name": "t"}, "draft": None, "torch": "0", "hass_ext": "0",
       "settings": {}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASS_EXT_CACHE", str(tmp_path))
    monkeypatch.delenv(calibration.RECALIBRATE_ENV, raising=False)
    return tmp_path


def _measure(calls):
    def measure(tick, steps):
        calls.append(steps)
        for _ in range(steps):
            tick()
        return {"value": 1.5 + len(calls)}
    return measure


def test_measured_once_then_read_from_the_cache(cache, capsys):
    calls = []
    first = calibrated(KEY, _measure(calls), 3)
    assert first.source == "measured" and calls == [3] and first.result == {"value": 2.5}
    assert first.path.startswith(str(cache)) and os.path.isfile(first.path)
    assert "measuring round costs on cpu-x" in capsys.readouterr().err  # announced, with a progress bar
    again = calibrated(KEY, _measure(calls), 3)
    assert again.source == "cache" and calls == [3] and again.result == first.result and again.seconds == 0
    assert "read from the calibration cache" in again.describe()
    other = calibrated(dict(KEY, device="cpu-y"), _measure(calls), 3)  # another key: another file
    assert other.source == "measured" and other.path != first.path


def test_recalibrate_by_argument_or_environment(cache, monkeypatch):
    calls = []
    calibrated(KEY, _measure(calls), 1)
    assert calibrated(KEY, _measure(calls), 1, recalibrate=True).result == {"value": 3.5}
    monkeypatch.setenv(calibration.RECALIBRATE_ENV, "1")
    assert calibrated(KEY, _measure(calls), 1).source == "measured" and len(calls) == 3
    monkeypatch.setenv(calibration.RECALIBRATE_ENV, "0")
    assert calibrated(KEY, _measure(calls), 1).source == "cache"


@pytest.mark.parametrize("content, why", [("{broken", "unreadable"),
                                           (json.dumps({"format": 1, "key": {"other": 1}, "result": {}}),
                                            "other settings")])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(cache, content, why):
    calls = []
    path = calibrated(KEY, _measure(calls), 1).path
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match=why):
        again = calibrated(KEY, _measure(calls), 1)
    assert again.source == "measured" and len(calls) == 2
    assert calibrated(KEY, _measure(calls), 1).source == "cache"  # rewritten


def test_cached_result_of_the_wrong_shape_is_measured_again(cache):
    calls = []

    def check(result):
        if "value" not in result:
            raise KeyError("value")

    path = calibrated(KEY, _measure(calls), 1, check=check).path
    with open(path, "w") as f:
        json.dump({"format": calibration.CALIBRATION_FORMAT, "key": KEY, "result": {"nothing": 0}}, f)
    with pytest.warns(RuntimeWarning, match="measuring again"):
        assert calibrated(KEY, _measure(calls), 1, check=check).source == "measured"


def test_key_names_the_kernel_build_and_a_rebuild_measures_again(cache, monkeypatch):
    from tiny_models import tiny_target

    target = tiny_target()
    key = calibration.calibration_key("test", target, None, context=1)
    assert key["kernels"] == calibration.kernels_identity() != "unknown"
    calls = []
    assert calibrated(key, _measure(calls), 1).source == "measured"
    same = calibration.calibration_key("test", target, None, context=1)
    assert calibrated(same, _measure(calls), 1).source == "cache"
    monkeypatch.setattr(calibration, "kernels_identity", lambda: "another build")  # the extension was rebuilt
    rebuilt = calibration.calibration_key("test", target, None, context=1)
    assert rebuilt["kernels"] == "another build" and calibrated(rebuilt, _measure(calls), 1).source == "measured"


SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import hass_ext
from tiny_models import tiny_target

target = tiny_target("llama", seed=3, vocab=64, hidden=32, heads=4, kv_heads=2, scale=4.0)
draft = hass_ext.init_draft(target, seed=1)
draft.tree_profile = {"format": 1, "shapes": [
    {"total_tokens": n, "depth": d, "tree_topk": k, "tau": t, "rounds": 1, "tokens": 1}
    for n, d, k, t in [(2, 1, 1, 1.3), (4, 3, 1, 1.6), (8, 3, 3, 2.0), (16, 4, 4, 2.2)]]}
prompt = torch.arange(1, 9)
r = hass_ext.generate(prompt, target=target, draft=draft, max_new_tokens=24, temperature=1.0, seed=7)
print(json.dumps({"text": r.text, "tree": r.tree.options(), "source": r.calibration.source,
                  "path": r.calibration.path, "setup": r.setup_seconds}))
"""


def test_sampled_generation_is_the_same_text_in_two_processes(tmp_path):
    env = dict(os.environ, HASS_EXT_CACHE=str(tmp_path), PYTHONPATH=ROOT)
    env.pop(calibration.RECALIBRATE_ENV, None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "tests")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert (first["source"], second["source"]) == ("measured", "cache")
    assert first["path"] == second["path"] and first["path"].startswith(str(tmp_path))
    assert second["tree"] == first["tree"]
    assert second["text"] == first["text"] and first["text"]
