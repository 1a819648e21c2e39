"""The examples of docs/kernels.md run as written (those of ops missing from this build are skipped)."""
import pytest

import hass_ext
from doc_examples import DOC, examples, missing_ops, run

EXAMPLES = examples()


def test_every_registered_op_is_documented():
    text = DOC.read_text()
    undocumented = [op for op in hass_ext.registered_ops() if f"hass.{op}" not in text]
    assert not undocumented, f"torch.ops.hass ops missing from docs/kernels.md: {undocumented}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[ex.name for ex in EXAMPLES])
def test_example_runs(example):
    missing = missing_ops(example)
    if missing:
        pytest.skip(f"not registered in this build: {', '.join(missing)}")
    run(example)
