import numpy as np
import pytest

from mtrain.config import DataConfig, DataSource, ModelConfig
from mtrain.data import Batches, SubwordSampler, collate, load_corpus, target_vocabulary, token_batches
from mtrain.errors import MtrainError
from conftest import SAMPLE_DE, SAMPLE_EN


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


def sampled_setup(tmp_path, toks, alpha=0.1, max_len=128, seed=5, sides="both"):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), max_len=max_len)
    source = DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE))
    best = load_corpus(source, toks, cfg, log=lambda *_: None)
    return best, SubwordSampler(source, toks, cfg, best, alpha=alpha, nbest=-1, seed=seed, sides=sides)


def pairs_of(corpus):
    return [tuple(x.tolist() for x in corpus.pair(i)) for i in range(len(corpus))]


def test_subword_sampling_is_reproducible_and_keeps_the_text(tmp_path, toks):
    best, sampler = sampled_setup(tmp_path, toks)
    epoch1, epoch2 = sampler(1), sampler(2)
    assert len(epoch1) == len(best)
    assert pairs_of(epoch1) == pairs_of(sampled_setup(tmp_path, toks)[1](1))  # same seed and epoch, same draw
    assert pairs_of(epoch1) != pairs_of(epoch2)  # a new draw each epoch
    assert pairs_of(epoch1) != pairs_of(best)
    decode = toks.src.decode_batch
    for side in (0, 1):  # other pieces, the same text
        assert decode([p[side] for p in pairs_of(epoch1)]) == decode([p[side] for p in pairs_of(best)])
    # alpha 0.1 is a flat distribution over segmentations: more, shorter pieces
    assert epoch1.tgt_lengths.sum() > best.tgt_lengths.sum()


@pytest.mark.parametrize("sampled, kept", [(0, 1), (1, 0)])
def test_sampling_one_side_keeps_the_other_sides_best_pieces(tmp_path, toks, sampled, kept):
    best, sampler = sampled_setup(tmp_path, toks, sides=("src", "tgt")[sampled])
    one_side = pairs_of(sampler(1))
    assert [p[kept] for p in one_side] == [p[kept] for p in pairs_of(best)]  # untouched, id for id
    assert [p[sampled] for p in one_side] != [p[sampled] for p in pairs_of(best)]
    # the sampled side draws what sampling both sides draws for it (the same seed per side)
    assert [p[sampled] for p in one_side] == [p[sampled] for p in pairs_of(sampled_setup(tmp_path, toks)[1](1))]
    decode = toks.src.decode_batch
    assert decode([p[sampled] for p in one_side]) == decode([p[sampled] for p in pairs_of(best)])


def test_sampled_segmentations_obey_the_length_filter(tmp_path, toks):
    best, sampler = sampled_setup(tmp_path, toks, max_len=18)
    sampled = sampler(1)
    assert len(sampled) == len(best)
    assert (sampled.src_lengths <= 18).all() and (sampled.tgt_lengths <= 18).all()
    fell_back = [a == b for a, b in zip(pairs_of(sampled), pairs_of(best))]
    assert any(fell_back)  # the longest pairs keep their best segmentation
    # the filter dropped pairs, and the sampler's text (picked by the cache's kept mask) still lines
    # up with the kept pairs, pair by pair
    assert best.report["too_long"] > 0 and len(best.kept) == best.report["read"] - best.report["empty"]
    decode = toks.src.decode_batch
    for side in (0, 1):
        assert decode([p[side] for p in pairs_of(sampled)]) == decode([p[side] for p in pairs_of(best)])


def test_subword_sampler_refuses_a_corpus_that_is_not_the_cached_one(tmp_path, toks):
    best, _ = sampled_setup(tmp_path, toks, max_len=18)
    best.kept = best.kept[:-1]
    with pytest.raises(MtrainError, match="delete .*cache and start again"):
        SubwordSampler(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks, DataConfig(), best, 0.1, -1, 5)


def test_sampled_batches_resume_across_epochs(tmp_path, toks):
    best, sampler = sampled_setup(tmp_path, toks)
    stream = Batches(best, 60, seed=7, resample=sampler)
    for _ in range(5):
        stream.next()
    state = stream.state_dict()
    rest = [stream.next() for _ in range(12)]
    assert stream.epoch > 1
    resumed = Batches(best, 60, seed=7, resample=sampled_setup(tmp_path, toks)[1])
    assert resumed.load_state_dict(state) is None
    for a, b in zip(rest, [resumed.next() for _ in range(12)]):
        x, y = a.collate(0, 2, 3), b.collate(0, 2, 3)
        assert x.src.equal(y.src) and x.tgt_out.equal(y.tgt_out)
        assert a.n_tgt_tokens == x.n_tgt_tokens
    # batches are cut by the sampled lengths, which differ from the best ones
    assert [s.indices.tolist() for s in rest] != [
        s.indices.tolist() for s in (lambda b: [b.next() for _ in range(17)][5:])(Batches(best, 60, seed=7))]


def test_the_seen_output_vocabulary_is_every_target_piece_and_eos_and_unk(tmp_path, toks):
    corpus = load_corpus(DataSource(src=str(SAMPLE_EN), tgt=str(SAMPLE_DE)), toks,
                         DataConfig(cache_dir=str(tmp_path / "cache")), log=lambda *_: None)
    V = toks.tgt.vocab_size
    assert target_vocabulary(ModelConfig(output_vocab="all"), corpus, V, toks.tgt.eos, toks.tgt.unk) is None
    ids = target_vocabulary(ModelConfig(output_vocab="seen"), corpus, V, toks.tgt.eos, toks.tgt.unk)
    in_targets = {int(i) for n in range(len(corpus)) for i in corpus.pair(n)[1]}
    assert ids.tolist() == sorted(in_targets | {toks.tgt.eos, toks.tgt.unk})
    # the joint vocabulary holds English pieces that no German target uses: those are left out
    in_sources = {int(i) for n in range(len(corpus)) for i in corpus.pair(n)[0]}
    assert in_sources - in_targets and not set(ids.tolist()) & (in_sources - in_targets - {toks.tgt.unk})
