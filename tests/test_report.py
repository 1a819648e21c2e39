"""bench/report.py: the README's compact table has a row per headline benchmark with a result file, each
linking to an existing file, and docs/results.md gets every benchmark's full table."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compact_table_rows_and_links():
    report = _report()
    docs = report._latest_docs(report.RESULTS)
    text = report.compact_section(report.RESULTS, str(ROOT))
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| result")]
    expected = [name for name, _ in report.HEADLINES if name in docs]
    gpu = report._gpu_rows(report.RESULTS, str(ROOT))
    assert len(rows) == len(expected) + len(gpu), (expected, rows)
    if report._gpu_docs(report.RESULTS):  # a GPU check folder: its headlines, each naming the device
        assert gpu and all("| GPU " in ln for ln in rows[len(expected):])
        assert "No GPU result" not in text
    for link in re.findall(r"\]\(([^)]+)\)", text):
        if link.startswith("docs/"):
            continue
        assert (ROOT / link).is_file(), link


def test_full_section_has_every_benchmark(tmp_path):
    report = _report()
    docs = report._latest_docs(report.RESULTS)
    text = report.full_section(report.RESULTS, str(ROOT / "docs"))
    for name in docs:
        assert f"### {name} (" in text
    for link in re.findall(r"\]\((\.\./[^)]+)\)", text):
        assert (ROOT / "docs" / link).resolve().is_file(), link


def test_replace_keeps_text_outside_markers(tmp_path):
    report = _report()
    f = tmp_path / "x.md"
    f.write_text("before\n<!-- a -->\nold\n<!-- b -->\nafter\n")
    report._replace(str(f), ("<!-- a -->", "<!-- b -->"), "new\n")
    assert f.read_text() == "before\n<!-- a -->\nnew\n<!-- b -->\nafter\n"
