"""bench/bench_tree_shapes.py on a tiny target: one row per profiled shape, with measured round costs and the
expected speedup computed from them as the automatic tree does."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_per_shape_and_speedups(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join("bench", "bench_tree_shapes.py"), "--quick", "--device", "cpu",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "tree_shapes_cpu-quick.json").read_text())
    rows = doc["rows"]
    assert [r["tree"] for r in rows] == ["2/1/1", "3/1/2", "4/2/2"]
    for r in rows:
        assert r["round_ms"] > 0 and r["round / vanilla step"] > 0
        assert abs(r["expected_speedup"] - r["tau"] / r["round / vanilla step"]) < 1e-9 * r["expected_speedup"]
    best = max(rows, key=lambda r: r["expected_speedup"])
    assert f"Best: {best['tree']}" in (tmp_path / "tree_shapes_cpu-quick.md").read_text()
