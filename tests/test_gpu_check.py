"""bench/gpu_check.sh --dry-run: the GPU machine's one-command check walks every step on the CPU at tiny shapes,
writes at most 8 files into $OUT with the agreed names, and stops steps on its own under its time budget."""
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
STEPS = ["env", "build", "cxx_runtime", "tests", "bench_tree_attention", "bench_verify_tree", "sanitizer memcheck",
         "sanitizer racecheck", "bench_round", "bench_static_round", "bench_distill_loss", "bench_compact_kv",
         "bench_small_linear", "bench_batch"]
FILES = {"summary.md", "env.txt", "build.log", "tests.log", "tests.xml", "bench.tar.gz", "sanitizer.log"}


def run(out, *args, timeout=900):
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def summary_rows(out):
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STEPS:
            rows[cells[0]] = cells[1]
    return rows


def test_dry_run_walks_every_step(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "--dry-run", "--budget", "400")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # what comes back from the GPU machine: these files only, flat, at most 8
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == FILES and len(files) <= 8
    assert summary_rows(out) == {s: "ok" for s in STEPS}
    build = (out / "build.log").read_text()
    assert "HASS_BUILD_CUDA=1 MAX_JOBS=16" in build and "setup.py build_ext --inplace" in build
    # the extension's error messages (C++ stream formatting) come back as Python errors, not a crash
    assert "error message from the extension: small_linear: x must be" in build
    assert "would run: " in (out / "tests.log").read_text() and "-k cuda" in (out / "tests.log").read_text()
    assert "-x" not in (out / "tests.log").read_text().split("would run: ")[1].splitlines()[0].split()
    cases = ET.parse(out / "tests.xml").getroot().iter("testcase")
    assert sum(1 for _ in cases) > 0
    sanitizer = (out / "sanitizer.log").read_text()
    for tool in ("memcheck", "racecheck"):
        assert f"compute-sanitizer --tool {tool} --error-exitcode 9" in sanitizer
    assert "all cases agree with the CPU kernels" in sanitizer
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = set(tar.getnames())
    for stem in ("attention_cpu_quick", "verify_tree_quick", "round_cpu_hass_tree-quick", "round_cpu_sdpa-quick",
                 "round_cpu_hass_tree-ctx96-quick", "round_cpu_hass_tree-tree16_4_4-quick",
                 "bench_loss_quick", "small_linear_cpu-quick"):
        assert f"bench/{stem}.json" in names, names
    assert any(n.startswith("bench/compact_kv") and n.endswith(".json") for n in names), names
    for step in STEPS[3:]:
        if step.startswith("bench_"):
            assert f"bench/{step}.log" in names
    with tarfile.open(out / "bench.tar.gz") as tar:
        round_doc = json.load(tar.extractfile("bench/round_cpu_hass_tree-quick.json"))
    assert round_doc["config"]["attention"] == "hass_tree"


def test_budget_stops_steps_on_their_own(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run(out, "--dry-run", "--budget", "12", timeout=120)
    took = time.monotonic() - start
    assert took < 12 + 5 + 15, took  # the budget, the kill grace, and the start-up of the script itself
    rows = summary_rows(out)
    assert list(rows) == STEPS
    assert rows["bench_compact_kv"] == "skipped" and set(rows.values()) <= {"ok", "TIMEOUT", "skipped"}
    assert proc.returncode == (1 if "TIMEOUT" in rows.values() else 0)
    files = {p.name for p in out.iterdir()}
    assert "summary.md" in files and len(files) <= 8


def test_bad_arguments(tmp_path):
    proc = run(tmp_path, "--budget", "soon")
    assert proc.returncode == 2 and "--budget must be a whole number of seconds" in proc.stderr
    proc = run(tmp_path, "--fast")
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh" in proc.stderr
