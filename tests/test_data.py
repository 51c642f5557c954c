import numpy as np
from conftest import SAMPLE_DE, SAMPLE_EN

from mtrain.config import DataConfig, DataSource
from mtrain.data import Batches, collate, load_corpus, token_batches


def test_token_batches_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 1000), rng.integers(1, 60, 1000)
    batches = token_batches(src, tgt, 500, seed=3, epoch=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))  # every pair exactly once
    for b in batches:
        assert len(b) * max(src[b].max(), tgt[b].max()) <= 500
    again = token_batches(src, tgt, 500, seed=3, epoch=1)
    assert all((a == b).all() for a, b in zip(batches, again))  # reproducible
    other = token_batches(src, tgt, 500, seed=3, epoch=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other))  # reshuffled per epoch


def test_bucketing_keeps_padding_low():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 50, 5000)
    batches = token_batches(lengths, lengths, 2000, seed=1, epoch=1)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.9


def test_collate_shapes_and_specials():
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11]], pad=0, bos=2, eos=3)
    assert batch.src.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert batch.src_pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert batch.tgt_in.tolist() == [[2, 9, 0], [2, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, 3, 0], [10, 11, 3]]
    assert batch.n_tgt_tokens == 5


def test_cache_is_reused_and_filters_are_counted(tmp_path, toks):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_len=18)
    source = DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE))
    logs = []
    first = load_corpus(source, toks, cfg, log=logs.append)
    second = load_corpus(source, toks, cfg, log=logs.append)
    assert any("using cache" in line for line in logs[1:])
    assert first.report["kept"] + first.report["too_long"] + first.report["bad_ratio"] == 20
    assert first.report["too_long"] > 0  # max_len 18 drops the longer sample sentences
    assert len(first) == len(second) == first.report["kept"] > 0
    assert (first.src_lengths <= 18).all() and (first.tgt_lengths <= 18).all()
    s, t = first.pair(0)
    assert isinstance(s, np.ndarray) and s.dtype == np.int32


def test_batches_resume_mid_epoch(tmp_path, toks):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks, cfg, log=lambda *_: None)
    stream = Batches(corpus, 60, seed=7)
    seen = [stream.next().indices for _ in range(5)]
    state = stream.state_dict()
    rest = [stream.next().indices.tolist() for _ in range(12)]
    resumed = Batches(corpus, 60, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next().indices.tolist() for _ in range(12)] == rest
    assert stream.epoch > 1  # the stream crossed an epoch boundary
    assert len(seen) == 5


def test_a_corpus_rewritten_in_place_is_encoded_again(tmp_path, toks):
    import os
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text(SAMPLE_EN.read_text())
    tgt.write_text(SAMPLE_DE.read_text())
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    source = DataSource(src=str(src), tgt=str(tgt))
    first = load_corpus(source, toks, cfg, log=lambda *_: None)
    stat = tgt.stat()
    lines = SAMPLE_DE.read_text().splitlines()
    tgt.write_text("\n".join(reversed(lines)) + "\n")  # same size, other content
    os.utime(tgt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert tgt.stat().st_size == stat.st_size and tgt.stat().st_mtime_ns == stat.st_mtime_ns
    logs = []
    second = load_corpus(source, toks, cfg, log=logs.append)
    assert not any("using cache" in line for line in logs)
    assert list(second.pair(0)[1]) == list(first.pair(len(first) - 1)[1])


def test_a_changed_batch_order_is_not_resumed(tmp_path, toks):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks, cfg, log=lambda *_: None)
    stream = Batches(corpus, 60, seed=7)
    stream.next()
    state = stream.state_dict()
    assert Batches(corpus, 80, seed=7).load_state_dict(state) == "train.batch_tokens was 60, now 80"
    assert Batches(corpus, 60, seed=8).load_state_dict(state) == "train.seed was 7, now 8"
    smaller = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks,
                          DataConfig(cache_dir=str(tmp_path / "cache"), max_len=18), log=lambda *_: None)
    assert "training data or tokenizer changed" in Batches(smaller, 60, seed=7).load_state_dict(state)
    same = Batches(corpus, 60, seed=7)
    assert same.load_state_dict(state) is None and same.state_dict() == state
