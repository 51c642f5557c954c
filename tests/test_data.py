import numpy as np
from conftest import SAMPLE_DE, SAMPLE_EN

from mtrain.config import DataConfig, DataSource
from mtrain.data import Batches, Corpora, collate, collate_corpus, from_ids, load_corpus, token_batches


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
    assert isinstance(s, np.ndarray) and s.dtype == np.uint16  # a 100-piece vocabulary fits two bytes


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


def test_gathered_batches_equal_row_by_row_collation():
    rng = np.random.default_rng(5)
    src = [rng.integers(4, 90, rng.integers(0, 12)).tolist() for _ in range(60)]  # empty sequences too
    tgt = [rng.integers(4, 90, rng.integers(0, 12)).tolist() for _ in range(60)]
    corpus = from_ids(src, tgt)
    for indices in (np.array([3]), rng.permutation(60)[:17], np.arange(60)):
        a = collate_corpus(corpus, indices, 0, 2, 3)
        b = collate([src[i] for i in indices], [tgt[i] for i in indices], 0, 2, 3)
        for name in ("src", "src_pad_mask", "tgt_in", "tgt_out"):
            assert getattr(a, name).equal(getattr(b, name)), name
        assert a.n_tgt_tokens == b.n_tgt_tokens


def small_corpora(sizes, weights, seed=0):
    rng = np.random.default_rng(seed)
    parts = [from_ids([rng.integers(4, 50, rng.integers(1, 9)).tolist() for _ in range(n)],
                      [rng.integers(4, 50, rng.integers(1, 9)).tolist() for _ in range(n)]) for n in sizes]
    return Corpora(parts, weights, [f"c{i}" for i in range(len(sizes))])


def test_one_corpus_keeps_the_batch_order_it_had_alone(tmp_path, toks):
    corpus = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks,
                         DataConfig(cache_dir=str(tmp_path / "cache")), log=lambda *_: None)
    stream = Batches(corpus, 60, seed=7)
    for epoch in (1, 2):
        expected = token_batches(corpus.src_lengths, corpus.tgt_lengths, 60, 7, epoch)
        got = [stream.next().indices for _ in expected]
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), epoch
    assert stream.epoch_pairs == {"corpus 0": len(corpus)}


def test_weights_draw_each_corpus_their_share_per_epoch():
    corpora = small_corpora([40, 30, 20], [2.0, 1.0, 0.5])
    stream = Batches(corpora, 60, seed=3)
    seen = {}
    for _ in range(3):
        first = stream.next()  # the first batch of the next epoch
        epoch = stream.epoch
        ids = np.concatenate([first.indices, *[stream.next().indices for _ in range(len(stream.epoch_batches()) - 1)]])
        counts = np.bincount(corpora.part_of(ids), minlength=3)
        assert counts.tolist() == [80, 30, 10] and stream.epoch_pairs == {"c0": 80, "c1": 30, "c2": 10}
        assert (np.bincount(ids[corpora.part_of(ids) == 0] - 0, minlength=40) == 2).all()  # each pair twice
        seen[epoch] = sorted(ids[corpora.part_of(ids) == 2].tolist())
        assert len(set(seen[epoch])) == 10  # a sample without repeats
    assert seen[1] != seen[2] or seen[2] != seen[3]  # another half each epoch
    again = Batches(small_corpora([40, 30, 20], [2.0, 1.0, 0.5]), 60, seed=3)
    for _ in range(7):
        again.next()
    state = again.state_dict()
    rest = [again.next().indices for _ in range(20)]
    resumed = Batches(small_corpora([40, 30, 20], [2.0, 1.0, 0.5]), 60, seed=3)
    assert resumed.load_state_dict(state) is None
    assert all(np.array_equal(a, resumed.next().indices) for a in rest)  # exact, across epochs
    other = Batches(small_corpora([40, 30, 20], [1.0, 1.0, 0.5]), 60, seed=3)
    assert "weights of data.train were [2.0, 1.0, 0.5], now [1.0, 1.0, 0.5]" in other.load_state_dict(state)


def test_the_next_epoch_made_ahead_in_a_thread_is_the_epoch_made_in_place():
    plain, ahead = (Batches(small_corpora([40, 30, 20], [2.0, 1.0, 0.5]), 60, seed=5, lookahead=flag)
                    for flag in (False, True))
    for _ in range(200):  # several epochs
        a, b = plain.next(), ahead.next()
        assert np.array_equal(a.indices, b.indices) and plain.epoch_pairs == ahead.epoch_pairs
    assert ahead.epoch > 3 and ahead._next is not None and ahead._next[0] == ahead.epoch + 1
    resumed = Batches(small_corpora([40, 30, 20], [2.0, 1.0, 0.5]), 60, seed=5, lookahead=True)
    resumed.next()  # makes epoch 1, and epoch 2 ahead, which the resumed position does not want
    assert resumed.load_state_dict(plain.state_dict()) is None
    assert all(np.array_equal(plain.next().indices, resumed.next().indices) for _ in range(100))


def test_a_batch_across_corpora_collates_each_pair_from_its_own():
    corpora = small_corpora([5, 4], [1.0, 1.0])
    indices = np.array([7, 1, 4, 5])
    pairs = [corpora.parts[0].pair(1), corpora.parts[0].pair(4), corpora.parts[1].pair(0), corpora.parts[1].pair(2)]
    order = [pairs[3], pairs[0], pairs[1], pairs[2]]
    batch = corpora.collate(indices, 0, 2, 3)
    expected = collate([s.tolist() for s, _ in order], [t.tolist() for _, t in order], 0, 2, 3)
    assert batch.src.equal(expected.src) and batch.tgt_out.equal(expected.tgt_out)


def test_a_tag_is_the_first_source_piece(tmp_path, spm_model):
    from mtrain.config import TokenizerConfig
    from mtrain.errors import MtrainError
    from mtrain.tokenizer import Tokenizer, Tokenizers, train_tokenizer
    path = train_tokenizer([SAMPLE_EN, SAMPLE_DE], TokenizerConfig(vocab_size=100, user_defined_symbols=["<2de>"]),
                           tmp_path / "tagged")
    tok = Tokenizer.load(path)
    tagged = Tokenizers(tok, tok)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    plain = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), tagged, cfg, log=lambda *_: None)
    tag = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE), tag="<2de>"), tagged, cfg,
                      log=lambda *_: None)
    piece = tok.sp.piece_to_id("<2de>")
    for i in range(len(plain)):
        assert tag.pair(i)[0].tolist() == [piece, *plain.pair(i)[0].tolist()]
        assert tag.pair(i)[1].tolist() == plain.pair(i)[1].tolist()
    untagged = Tokenizer.load(spm_model)
    try:
        load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE), tag="<2fr>"), Tokenizers(untagged, untagged),
                    cfg, log=lambda *_: None)
        raise AssertionError("a tag the tokenizer lacks was accepted")
    except MtrainError as e:
        assert "tag <2fr> is not one piece of the source tokenizer" in str(e)


def test_updates_collated_ahead_are_those_of_the_loop():
    """The background thread changes when batches are collated, not which: the same updates, and the
    stream's position is the loop's (after the update it took), not the thread's."""
    import torch

    from mtrain.data import UpdateStream
    streams = [UpdateStream(Batches(small_corpora([40, 30], [1.5, 1.0]), 60, seed=4), 3, slice(1, 3), (0, 2, 3),
                            torch.device("cpu"), ahead=ahead) for ahead in (0, 2)]
    try:
        for _ in range(25):  # several epochs
            a, b = (s.next() for s in streams)
            assert (a.n_tokens, a.position, a.epoch, a.epoch_pairs) == (b.n_tokens, b.position, b.epoch, b.epoch_pairs)
            assert len(a.batches) == len(b.batches) == 2
            assert all(x.src.equal(y.src) and x.tgt_out.equal(y.tgt_out) for x, y in zip(a.batches, b.batches))
            assert streams[1].state_dict() == streams[0].state_dict() == a.position
            assert streams[1].epochs_done == streams[0].epochs_done
    finally:
        for s in streams:
            s.close()


def test_an_error_while_collating_ahead_reaches_the_loop():
    import pytest
    import torch

    from mtrain.data import UpdateStream
    from mtrain.errors import MtrainError
    batches = Batches(small_corpora([10], [1.0]), 60, seed=4)
    calls = {"n": 0}
    real = batches.next

    def failing():
        calls["n"] += 1
        if calls["n"] == 3:
            raise MtrainError("corpus.en: line 3: invalid UTF-8")
        return real()

    batches.next = failing
    stream = UpdateStream(batches, 1, slice(0, 1), (0, 2, 3), torch.device("cpu"), ahead=2)
    try:
        stream.next(), stream.next()
        with pytest.raises(MtrainError, match="line 3: invalid UTF-8"):
            stream.next()
    finally:
        stream.close()


def test_cutting_by_bisection_equals_the_greedy_walk():
    """cut_sorted finds each cut by bisection; the batches are those of walking the pairs one by one."""
    from mtrain.data import cut_sorted

    def walk(order, lengths, max_tokens):  # the definition: extend a run while n * longest fits
        batches, start, width = [], 0, 0
        for i, n in enumerate(lengths[order].tolist()):
            width = max(width, n)
            if (i - start + 1) * width > max_tokens and i > start:
                batches.append(order[start:i])
                start, width = i, n
        return batches + ([order[start:]] if start < len(order) else [])

    rng = np.random.default_rng(2)
    for n, budget in ((1, 10), (500, 300), (3000, 2048), (800, 5)):  # 5: every pair over the budget
        lengths = rng.integers(1, 120, n)
        order = np.lexsort((rng.random(n), lengths))
        a, b = cut_sorted(order, lengths, budget), walk(order, lengths, budget)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), (n, budget)


def test_the_packed_length_order_is_lexsorts():
    from mtrain.data import length_order
    rng = np.random.default_rng(9)
    for n in (1, 2, 50, 20000):
        longest = rng.integers(1, 40, n)
        shortest = np.minimum(longest, rng.integers(1, 40, n))
        tiebreak = rng.random(n)
        tiebreak[: n // 3] = 0.5  # ties in the tie-break too: index order decides, as in lexsort
        assert np.array_equal(length_order(longest, shortest, tiebreak), np.lexsort((tiebreak, shortest, longest)))


def test_ids_are_stored_in_two_bytes_when_the_vocabulary_allows(tmp_path, toks):
    from pathlib import Path
    corpus = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks,
                         DataConfig(cache_dir=str(tmp_path / "cache")), log=lambda *_: None)
    assert corpus.src.dtype == np.uint16 and corpus.tgt.dtype == np.uint16
    (folder,) = (tmp_path / "cache").iterdir()
    assert Path(folder / "src.bin").stat().st_size == 2 * len(corpus.src)
    lines = SAMPLE_EN.read_text().splitlines()
    assert [corpus.pair(i)[0].tolist() for i in range(len(corpus))] == toks.src.encode_batch(lines)
