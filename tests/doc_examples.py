"""The runnable examples of docs/kernels.md: python code blocks whose fence names the ops they need,

    ```python requires=verify_tree,compact_kv

Used by tests/test_docs_kernels.py (in process) and tests/test_wheels.py (run as a script by the python of a
venv with an installed wheel: ``python tests/doc_examples.py docs/kernels.md``). An example whose ops are not
registered in this build is skipped, not failed.
"""
import re
import sys
from pathlib import Path
from typing import List, NamedTuple

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels.md"
_FENCE = re.compile(r"^```python[ \t]+requires=(?P<ops>[\w,]+)[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)


class Example(NamedTuple):
    line: int            # 1-based line of the opening fence
    requires: List[str]  # op names of torch.ops.hass
    code: str

    @property
    def name(self) -> str:
        return f"{'+'.join(self.requires)}@L{self.line}"


def examples(path=DOC) -> List[Example]:
    text = Path(path).read_text()
    return [Example(text.count("\n", 0, m.start()) + 1, m.group("ops").split(","), m.group("code"))
            for m in _FENCE.finditer(text)]


def run(example: Example) -> None:
    """Executes one example in a namespace of its own (as if it were a script)."""
    code = compile(example.code, f"<docs/kernels.md:{example.line}>", "exec")
    exec(code, {"__name__": "__main__"})


def missing_ops(example: Example) -> List[str]:
    import hass_ext

    registered = set(hass_ext.registered_ops())
    return [op for op in example.requires if op not in registered]


def main(argv) -> int:
    import hass_ext

    path = argv[1] if len(argv) > 1 else DOC
    print(f"hass_ext from {Path(hass_ext.__file__).parent}; ops: {', '.join(hass_ext.registered_ops())}")
    passed = failed = skipped = 0
    for ex in examples(path):
        missing = missing_ops(ex)
        if missing:
            skipped += 1
            print(f"SKIP {ex.name}: not registered in this build: {', '.join(missing)}")
            continue
        try:
            run(ex)
        except Exception as e:  # report every example, then fail
            failed += 1
            print(f"FAIL {ex.name}: {type(e).__name__}: {e}")
        else:
            passed += 1
            print(f"ok   {ex.name}")
    print(f"examples: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
