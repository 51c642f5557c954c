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
        assert re.search(rf"(def|class) {symbol}\b", text), \
            f"{name} -> {path}#L{line}: {text.strip()!r} (python scripts/dev/relink_docs.py re-points the links)"


def config_keys() -> dict:
    """Every key of mtrain/config.py as `section.key`, with its default; data.train's corpus keys
    once (data.valid takes the same)."""
    import dataclasses

    from mtrain.config import Config, DataSource
    keys = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            default = getattr(getattr(Config(), section.name), f.name)
            if f.name == "train" and section.name == "data":  # a list of corpora: the keys of each
                keys.update({f"data.train.{g.name}": getattr(DataSource(), g.name) for g in dataclasses.fields(DataSource)})
            elif isinstance(default, DataSource):
                keys[f"{section.name}.{f.name}"] = None  # a corpus, no default
            else:
                keys[f"{section.name}.{f.name}"] = default
    return keys


def test_the_config_reference_lists_every_key_with_its_default():
    import yaml
    rows = re.findall(r"^\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", (ROOT / "docs" / "config.md").read_text(), re.M)
    documented = {name: cell.strip() for name, cell in rows}
    keys = config_keys()
    assert sorted(documented) == sorted(keys), (set(documented) ^ set(keys))
    assert len(rows) == len(documented)  # each key once
    for name, default in keys.items():
        cell = documented[name]
        if default is None:
            continue
        if isinstance(default, bool):
            assert cell == str(default).lower(), name
        elif isinstance(default, (int, float)):
            assert float(cell) == default, name
        elif isinstance(default, list):
            assert yaml.safe_load(cell) == default, name
        else:
            assert cell == (default or '""'), name


def test_the_readme_is_a_guide_without_history():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    # no "n-th try", private run folders or commit hashes where a user reads
    history = re.compile(r"\b\w+(st|nd|rd|th) (try|tries)\b|runs/exp/|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")
    for text in (readme, *[p.read_text() for p in (ROOT / "configs").glob("*.yaml")]):
        assert not history.search(text), history.search(text)
    for link in re.findall(r"\]\(((?!http)[^)#]+)", readme):  # links inside the repository resolve
        assert (ROOT / link).exists(), link


def test_the_results_page_reports_without_history():
    """docs/results.md says what was run, where, and the figure; the history (goals missed or met,
    what a round of work changed, the version before) belongs to the notebook, docs/sweeps."""
    text = (ROOT / "docs" / "results.md").read_text()
    history = re.compile(r"short of|this round|this version|previous (version|recipe)|\btargets?\b (of|for|was|set)|"
                         r"\bgoal\b|runs/exp/|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b|\b\w+(st|nd|rd|th) try",
                         re.IGNORECASE)
    assert not history.search(text), history.search(text)
    assert "sweeps/runs.md" in text  # where the history went


def test_docs_link_only_inside_the_repository():
    for page in (ROOT / "docs").rglob("*.md"):
        for link in re.findall(r"\]\(((?!https?:)[^)#]*)", page.read_text()):
            if link:
                assert (page.parent / link).resolve().is_relative_to(ROOT) and (page.parent / link).exists(), \
                    f"{page.relative_to(ROOT)}: {link}"


def anchors(page) -> set:
    """The anchors a Markdown page offers: <a id> tags and GitHub's slugs of its headings."""
    text = page.read_text()
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", text, re.M)}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def test_links_to_anchors_find_them():
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    checked = 0
    for page in pages:
        for target, anchor in re.findall(r"\]\(((?!https?:)[^)#]*\.md|)#([^)]+)\)", page.read_text()):
            where = (page.parent / target) if target else page
            assert anchor in anchors(where), f"{page.relative_to(ROOT)}: {target}#{anchor}"
            checked += 1
    assert checked >= 20
