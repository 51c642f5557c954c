import pytest
import torch

from mtrain.config import ModelConfig
from mtrain.model import Dropout, Transformer

CFG = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=32, heads=4, ffn_dim=64, dropout=0.0)


def make(cfg=CFG, vocab=40):
    torch.manual_seed(0)
    return Transformer(cfg, vocab, vocab, pad=0).eval()


def test_padding_does_not_leak():
    model = make()
    src = torch.tensor([[5, 6, 7, 3, 0, 0]])
    tgt = torch.tensor([[2, 9, 10]])
    out = model.decode(tgt, model.encode(src, src == 0), src == 0)
    changed = src.clone()
    changed[0, 4:] = 0
    other = torch.tensor([[5, 6, 7, 3, 0, 0]])
    mask = torch.tensor([[False, False, False, False, True, True]])
    other[0, 4:] = torch.tensor([11, 12])  # garbage under the padding mask
    out2 = model.decode(tgt, model.encode(other, mask), mask)
    assert torch.allclose(out, out2, atol=1e-6)
    shorter = model.decode(tgt, model.encode(src[:, :4], src[:, :4] == 0), src[:, :4] == 0)
    assert torch.allclose(out, shorter, atol=1e-5)


def test_future_tokens_do_not_leak():
    model = make()
    src = torch.tensor([[5, 6, 7, 3]])
    memory = model.encode(src, src == 0)
    a = model.decode(torch.tensor([[2, 9, 10, 11]]), memory, src == 0)
    b = model.decode(torch.tensor([[2, 9, 10, 30]]), memory, src == 0)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3], b[:, 3])  # the changed position itself does change


@pytest.mark.parametrize("pre_norm", [True, False])
def test_cached_decoding_equals_full_recompute(pre_norm):
    model = make(ModelConfig(**{**CFG.__dict__, "pre_norm": pre_norm}))
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])
    tgt = torch.tensor([[2, 9, 10, 11, 12], [2, 13, 14, 15, 16]])
    memory = model.encode(src, src == 0)
    full = model.decode(tgt, memory, src == 0)
    cache = model.new_cache(memory, src == 0, max_len=8)
    steps = torch.stack([model.decode_step(tgt[:, t], cache) for t in range(tgt.shape[1])], dim=1)
    assert torch.allclose(full, steps, atol=1e-5)


def test_a_sentence_that_joins_a_running_cache_decodes_as_alone():
    """Ragged rows: a sentence appended to a cache three positions in (with a longer source) reads
    only its own positions and takes its own position embeddings; leaving sentences shrink it back."""
    model = make()
    src_a, tgt_a = torch.tensor([[5, 6, 3]]), torch.tensor([[2, 9, 10, 11, 12, 13, 14]])
    src_b, tgt_b = torch.tensor([[7, 8, 9, 10, 3]]), torch.tensor([[2, 15, 16, 17]])
    full_a = model.decode(tgt_a, model.encode(src_a, src_a == 0), src_a == 0)[0]
    full_b = model.decode(tgt_b, model.encode(src_b, src_b == 0), src_b == 0)[0]
    cache = model.start(src_a, src_a == 0, max_len=8)
    steps_a = [model.decode_step(tgt_a[:, t], cache)[0] for t in range(3)]
    cache.append(model.start(src_b, src_b == 0, max_len=5))
    assert cache.ragged and cache.lengths.tolist() == [3, 0] and cache.src_mask.shape[-1] == 5
    steps_b = []
    for t in range(4):
        out = model.decode_step(torch.stack([tgt_a[0, 3 + t], tgt_b[0, t]]), cache)
        steps_a.append(out[0])
        steps_b.append(out[1])
    assert torch.allclose(full_a, torch.stack(steps_a), atol=1e-5)
    assert torch.allclose(full_b, torch.stack(steps_b), atol=1e-5)
    cache.keep(torch.tensor([0]))  # b, with the longer source, leaves
    assert not cache.ragged and cache.longest == 7 and cache.src_mask.shape[-1] == 3
    assert cache.cross_k[0].shape[2] == 3
    # Back on the aligned path (one column for all rows), a's last step still matches.
    last = model.decode(torch.cat([tgt_a, torch.tensor([[20]])], 1), model.encode(src_a, src_a == 0), src_a == 0)
    assert torch.allclose(model.decode_step(torch.tensor([20]), cache)[0], last[0, -1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sentence_joins_under_autocast_and_the_cache_is_in_the_compute_dtype(dtype):
    """Under autocast the keys come out in bf16/fp16: the cache holds them so (half the memory, no
    cast per step), and a sentence that joins a running cache (the ragged write) decodes as it does
    alone. The join raised 'Index put requires the source and destination dtypes match' before."""
    model = make()
    src_a, src_b = torch.tensor([[5, 6, 3]]), torch.tensor([[7, 8, 9, 10, 3]])
    tgt_a, tgt_b = torch.tensor([2, 9, 10, 11]), torch.tensor([2, 15, 16])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        cache = model.start(src_a, src_a == 0, max_len=8)
        assert cache.self_k[0].dtype == cache.cross_k[0].dtype == dtype
        model.decode_step(tgt_a[:1], cache)
        cache.append(model.start(src_b, src_b == 0, max_len=8))
        got = [model.decode_step(torch.stack([tgt_a[1 + t], tgt_b[t]]), cache)[1] for t in range(3)]
        alone = model.start(src_b, src_b == 0, max_len=8)
        want = [model.decode_step(tgt_b[t:t + 1], alone)[0] for t in range(3)]
    assert cache.self_k[0].dtype == dtype
    for g, w in zip(got, want):  # batched and single matmuls in half precision: a half-precision tolerance
        assert torch.allclose(g.float(), w.float(), atol=0.05, rtol=0.02)


def test_the_cache_storage_stays_within_twice_what_its_rows_need():
    """Sentences of growing length join one after another, then most leave: every dimension of the
    storage stays within 2x what the live rows need (it doubled at every growth before: 2,560 rows
    for 50), and it shrinks once they need less than half of it."""
    from mtrain.search import BeamSearch

    model = make()
    search = BeamSearch(model, beam=5, min_len=1000, bos=2, eos=3, pad=0)
    with torch.no_grad():
        for L in (3, 5, 8, 12, 18, 27, 41, 62, 93, 140):
            s = torch.full((1, L), 7)
            s[0, -1] = 3
            search.add(s, s == 0)
            search.step()
            cache = search.cache
            rows, columns = cache.store[0][0].shape[0], cache.store[0][0].shape[2]
            sentences, src_columns = cache.store[2][0].shape[0], cache.store[2][0].shape[2]
            assert len(search) * 5 <= rows <= 2 * len(search) * 5
            assert len(search) <= sentences <= 2 * len(search)
            need = int(cache.limits.max())
            assert need <= columns <= 2 * need
            assert L <= src_columns <= 2 * L
        # all but the first (shortest) sentence leave: rows and columns shrink to what it needs
        cache.keep(torch.arange(5))
        assert cache.store[0][0].shape[0] <= 10 and cache.store[2][0].shape[0] <= 2
        assert cache.store[0][0].shape[2] <= 2 * int(cache.limits.max()) and cache.store[2][0].shape[2] <= 6
        assert cache.self_k[0].shape[0] == 5 and cache.src_mask.shape[-1] == 3


def test_storage_size_rule():
    from mtrain.model import storage_size

    assert storage_size(10, 10) == 10 and storage_size(20, 10) == 20  # fits, at most twice: kept
    assert storage_size(10, 11) == 14  # grows to 1.25x the need
    assert storage_size(21, 10) == 13  # over twice the need: shrinks to 1.25x it
    assert storage_size(0, 3) == 4


def test_shared_embeddings_and_parameter_count():
    model = make()
    assert model.src_embed is model.tgt_embed and model.output.weight is model.tgt_embed.weight
    separate = Transformer(ModelConfig(**{**CFG.__dict__, "share_embeddings": False}), 40, 50, pad=0)
    # separate: source 40x32 + target 50x32 + output 50x32 instead of one shared 40x32 table
    assert separate.num_parameters() - model.num_parameters() == (40 + 50 + 50 - 40) * 32
    with pytest.raises(ValueError):
        Transformer(CFG, 40, 50, pad=0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_keeps_expectation(p):
    torch.manual_seed(0)
    drop = Dropout(p).train()
    y = drop(torch.ones(400_000))
    assert abs((y == 0).float().mean().item() - p) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)), rtol=1e-4)
    assert not torch.equal(drop(torch.ones(1000)), drop(torch.ones(1000)))  # a fresh mask each call
    assert torch.equal(drop.eval()(torch.ones(5)), torch.ones(5))


def test_dropout_masks_any_shape_uniformly():
    """Four 16-bit draws come from each 64-bit one: sizes that are not a multiple of 4 keep their
    shape, and every position of a 4-group (the bits of one draw) is dropped at the same rate."""
    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    y = drop(torch.ones(3, 5, 7))
    assert y.shape == (3, 5, 7)
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75)))
    y = drop(torch.ones(100_000, 4))
    rates = (y == 0).float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 0.25), atol=0.01)
    grad_in = torch.ones(6, 9, requires_grad=True)
    out = drop(grad_in)
    out.sum().backward()
    assert torch.equal(grad_in.grad, out.detach())  # the gradient goes through the same mask and scale
    assert torch.equal(Dropout(0.0).train()(torch.ones(3)), torch.ones(3))


def test_positions_selected_by_index_are_those_of_the_mask():
    """forward() takes the real target positions as a (B, T) mask or as their flat indices (what a
    batch carries, found on the host, so that a GPU selects them without a sync): the same rows."""
    from mtrain.data import collate
    model = make().train()
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad=0, bos=2, eos=3)
    assert batch.tgt_index.tolist() == [0, 1, 4, 5, 6, 7] and batch.target.tolist() == [9, 3, 10, 11, 12, 3]
    args = batch.src, batch.src_pad_mask, batch.tgt_in
    torch.manual_seed(0)
    by_mask = model(*args, batch.tgt_out != 0)
    torch.manual_seed(0)
    by_index = model(*args, batch.tgt_index)
    assert torch.equal(by_mask, by_index)
    hidden = []
    for select in (batch.tgt_out != 0, batch.tgt_index):
        torch.manual_seed(0)  # the same dropout masks
        hidden.append(model(*args, select, project=False))
    assert torch.equal(hidden[0], hidden[1]) and hidden[0].shape == (6, model.cfg.d_model)


def test_one_seed_makes_one_model_with_separate_vocabularies():
    """The embeddings were initialised in the order of a set of the two modules, which follows their
    memory addresses: the same seed gave two different models, run to run (and within a run)."""
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, ffn_dim=32, share_embeddings=False)
    sums = set()
    for _ in range(20):
        torch.manual_seed(0)
        model = Transformer(cfg, 30, 40, pad=0)
        sums.add(tuple(float(p.detach().double().sum()) for p in model.parameters()))
    assert len(sums) == 1
