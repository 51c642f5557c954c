import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import SAMPLE_DE, SAMPLE_EN

from mtrain.config import DataSource
from mtrain.corpus import ReadStats, open_text, read_pairs
from mtrain.errors import MtrainError


def test_plain_and_gzip_pairs_drop_empty(tmp_path):
    (tmp_path / "a.en").write_text("one\n \ntwo\nthree\n")
    with gzip.open(tmp_path / "a.de.gz", "wt") as f:
        f.write("eins\nzwei\n\ndrei\n")
    stats = ReadStats()
    pairs = list(read_pairs(DataSource(src=str(tmp_path / "a.en"), tgt=str(tmp_path / "a.de.gz")), stats))
    assert pairs == [("one", "eins"), ("three", "drei")]
    assert (stats.pairs, stats.empty) == (2, 2)


def test_line_count_mismatch_names_both_files(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    with pytest.raises(MtrainError) as e:
        list(read_pairs(DataSource(src=str(tmp_path / "a.en"), tgt=str(tmp_path / "a.de"))))
    assert "a.en has 3 lines" in str(e.value) and "a.de has 2" in str(e.value)


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(MtrainError, match=r"bad.txt:3: invalid UTF-8"):
        list(open_text(tmp_path / "bad.txt"))


def test_missing_file(tmp_path):
    (tmp_path / "here.en").write_text("x\n")
    with pytest.raises(MtrainError, match="nope.de: file not found"):
        list(read_pairs(DataSource(src=str(tmp_path / "here.en"), tgt=str(tmp_path / "nope.de"))))


def test_tsv(tmp_path):
    (tmp_path / "c.tsv").write_text("hello\thallo\n\nworld\twelt\n")
    assert list(read_pairs(DataSource(tsv=str(tmp_path / "c.tsv")))) == [("hello", "hallo"), ("world", "welt")]
    (tmp_path / "bad.tsv").write_text("hello\thallo\nno tab here\n")
    with pytest.raises(MtrainError, match=r"bad.tsv:2: expected 2 tab-separated fields, found 1"):
        list(read_pairs(DataSource(tsv=str(tmp_path / "bad.tsv"))))


def test_hf_datasets_local_json(tmp_path):
    rows = [{"translation": {"en": "hello", "de": "hallo"}}, {"translation": {"en": "cat", "de": "Katze"}}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = DataSource(hf="json", hf_data_files=[str(tmp_path / "d.jsonl")], hf_split="train")
    assert list(read_pairs(source)) == [("hello", "hallo"), ("cat", "Katze")]
    wrong = DataSource(hf="json", hf_data_files=[str(tmp_path / "d.jsonl")], src_key="translation.fr")
    with pytest.raises(MtrainError, match="no field 'translation.fr'"):
        list(read_pairs(wrong))


def test_a_missing_relative_path_names_the_folder_it_was_read_from(tmp_path, monkeypatch):
    """Config data paths are read from the current folder, not the config's: the error says which."""
    from mtrain.corpus import check_input
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MtrainError, match=rf"^data/x\.en: file not found \(in {re.escape(str(tmp_path))}\)$"):
        check_input(Path("data/x.en"))
    with pytest.raises(MtrainError, match=r"^/nowhere/x\.en: file not found$"):
        check_input(Path("/nowhere/x.en"))


@pytest.mark.parametrize("loader", ["json", "parquet"])
def test_hf_local_loaders_read_in_batches_and_streaming(tmp_path, loader, monkeypatch):
    """Local json and parquet loaders (the hub is out of reach here), read in batches of records, the
    same with streaming; a batch boundary inside the split loses nothing."""
    import datasets

    import mtrain.corpus as corpus_module
    rows = [{"translation": {"en": f"sentence {i}", "de": f"Satz {i}"}} for i in range(25)]
    path = tmp_path / f"d.{loader}"
    datasets.Dataset.from_list(rows).to_json(path) if loader == "json" else datasets.Dataset.from_list(rows).to_parquet(path)
    monkeypatch.setattr(corpus_module, "HF_BATCH", 7)
    expected = [(f"sentence {i}", f"Satz {i}") for i in range(25)]
    for streaming in (False, True):
        source = DataSource(hf=loader, hf_data_files=[str(path)], hf_streaming=streaming)
        assert list(read_pairs(source)) == expected


def test_a_datasets_revision_is_part_of_the_cache_key(toks):
    from mtrain.data import cache_key
    a = DataSource(hf="wmt14", hf_config="de-en", src_key="translation.en", tgt_key="translation.de")
    b = DataSource(hf="wmt14", hf_config="de-en", src_key="translation.en", tgt_key="translation.de", hf_revision="v2")
    streamed = DataSource(hf="wmt14", hf_config="de-en", hf_streaming=True, name="wmt", weight=2.0)
    assert cache_key(a, toks, 128, 3.0, True) != cache_key(b, toks, 128, 3.0, True)
    assert cache_key(a, toks, 128, 3.0, True) == cache_key(streamed, toks, 128, 3.0, True)  # same records


def test_a_copy_of_the_data_in_another_folder_with_other_times_finds_the_cache(tmp_path, toks, monkeypatch):
    """Nodes with their own copy of the data: the same paths as written, other absolute paths and
    modification times, the same content: one cache key. Other content: another."""
    import os

    from mtrain.data import cache_key
    for node in ("a", "b"):
        (tmp_path / node / "data").mkdir(parents=True)
        for side, sample in (("en", SAMPLE_EN), ("de", SAMPLE_DE)):
            (tmp_path / node / "data" / f"c.{side}").write_bytes(sample.read_bytes())
    os.utime(tmp_path / "b" / "data" / "c.en", (1, 1))
    source = DataSource(src="data/c.en", tgt="data/c.de")
    keys = []
    for node in ("a", "b"):
        monkeypatch.chdir(tmp_path / node)
        keys.append(cache_key(source, toks, 128, 3.0, True))
    assert keys[0] == keys[1]
    (tmp_path / "b" / "data" / "c.en").write_text(SAMPLE_EN.read_text().replace("a", "e"))  # same size, new text
    assert cache_key(source, toks, 128, 3.0, True) != keys[0]
