"""docs/transformer.md stays true: its Python blocks run, and its links point at what they name."""

import re

from conftest import ROOT

DOC = ROOT / "docs" / "transformer.md"


def test_every_python_block_runs_in_order():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace = {}
    for n, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{DOC.name} block {n}", "exec"), namespace)
        except Exception as e:  # name the block, then fail
            raise AssertionError(f"block {n} of {DOC.name} failed: {type(e).__name__}: {e}") from e


def test_links_point_at_the_code_they_name():
    links = re.findall(r"\[`([\w.]+)`\]\(\.\./(mtrain/\w+\.py)#L(\d+)\)", DOC.read_text())
    assert len(links) >= 20
    for name, path, line in links:
        text = (ROOT / path).read_text().splitlines()[int(line) - 1]
        symbol = name.split(".")[-1]
        assert re.search(rf"(def|class) {symbol}\b", text), f"{name} -> {path}#L{line}: {text.strip()!r}"
