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
