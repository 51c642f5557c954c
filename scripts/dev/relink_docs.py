"""Re-point the docs' links to code (`[`name`](../mtrain/x.py#LN)`) at the lines that define `name`
now, after code above them moved; tests/test_docs.py checks them.

    python scripts/dev/relink_docs.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[`([\w.()]+)`\]\(([^)#]+\.py)#L(\d+)\)")


def relink(page: Path) -> bool:
    text = page.read_text()

    def fix(m: re.Match) -> str:
        symbol = m.group(1).split(".")[-1].rstrip("()")
        lines = (page.parent / m.group(2)).resolve().read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if re.search(rf"(def|class) {re.escape(symbol)}\b", line):
                return m.group(0).replace(f"#L{m.group(3)}", f"#L{n}")
        return m.group(0)  # not found: the test names it
    new = LINK.sub(fix, text)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if relink(page):
            print(f"re-pointed links in {page.relative_to(ROOT)}")
