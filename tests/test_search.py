from dataclasses import dataclass

import pytest
import torch

from mtrain.config import DecodeConfig, ModelConfig
from mtrain.model import Transformer
from mtrain.search import BeamSearch, beam_search, block_ngrams, length_penalty, sample

PAD, UNK, BOS, EOS = 0, 1, 2, 3
CFG = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=32, heads=4, ffn_dim=64, dropout=0.0)


def make(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG, 30, 30, pad=PAD).eval()
    with torch.no_grad():  # a peaked random model makes long, varied outputs
        model.output.weight.mul_(3.0)
    return model


def greedy_by_recompute(model, src, max_len):
    """Reference greedy decoding with no cache: the whole prefix is recomputed each step."""
    memory = model.encode(src, src == PAD)
    out = [BOS]
    for t in range(max_len):
        logits = model.decode(torch.tensor([out]), memory, src == PAD)[0, -1]
        logits[PAD] = logits[BOS] = float("-inf")
        if t + 1 >= max_len:
            return out[1:]
        nxt = int(logits.argmax())
        if nxt == EOS:
            return out[1:]
        out.append(nxt)
    return out[1:]


def search(model, src, **kw):
    args = dict(beam=1, lenpen=0.0, max_len_a=0.0, max_len_b=12, min_len=0, bos=BOS, eos=EOS, pad=PAD)
    args.update(kw)
    return beam_search(model, src, src == PAD, **args)


def test_beam_one_equals_greedy_recompute():
    model = make()
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD], [11, 12, 13, EOS, PAD]])
    hyps = search(model, src, lenpen=0.6)
    for b in range(3):
        assert hyps[b][0].tokens == greedy_by_recompute(model, src[b:b + 1], 13)  # 12 pieces, then EOS


def test_batched_equals_alone():
    model = make(1)
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD], [11, 12, 13, EOS, PAD]])
    together = search(model, src, beam=4, nbest=3, lenpen=0.6)
    for b in range(3):
        row = src[b:b + 1, :int((src[b] != PAD).sum())]
        alone = search(model, row, beam=4, nbest=3, lenpen=0.6)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[b]]
        # Batched and single matmuls differ in the last bits, by CPU kind too: compare with a tolerance.
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[b]], abs=1e-4)


def test_nbest_sorted_and_length_limits():
    model = make(2)
    src = torch.tensor([[5, 6, 7, 8, EOS]])
    hyps = search(model, src, beam=5, nbest=5, max_len_b=6, min_len=3)[0]
    assert len(hyps) == 5
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert all(3 <= len(h.tokens) <= 6 for h in hyps)  # a * |src| + b = 6 pieces, then EOS
    assert len({tuple(h.tokens) for h in hyps}) == 5


@dataclass
class TableCache:
    """Rows' prefixes, reordered by the search exactly as a KV cache is."""
    prefix: list

    def reorder(self, rows):
        self.prefix = [list(self.prefix[r]) for r in rows.tolist()]

    def keep(self, rows):
        self.reorder(rows)


class TableModel:
    """A hand-built model whose next-token distribution depends only on the prefix (tokens 4=A, 5=B).
    P(A)=0.6, P(B)=0.4; after A: EOS, A, B at 0.34/0.33/0.33; after B: EOS at 0.99.
    Greedy takes A then EOS (p=0.204); the best sequence is B EOS (p=0.396)."""

    cfg = ModelConfig(max_positions=64)

    def start(self, src, mask, max_len, repeat=1):
        return TableCache([[] for _ in range(src.shape[0] * repeat)])

    def log_probs(self, tokens, cache):
        probs = torch.full((len(tokens), 6), 1e-9)
        for i, tok in enumerate(tokens.tolist()):
            if tok != BOS:
                cache.prefix[i].append(tok)
            prefix = cache.prefix[i]
            if not prefix:
                probs[i, 4], probs[i, 5] = 0.6, 0.4
            elif prefix[0] == 4:
                probs[i, EOS], probs[i, 4], probs[i, 5] = 0.34, 0.33, 0.33
            else:
                probs[i, EOS], probs[i, 4] = 0.99, 0.01
        return probs.log()


def test_beam_finds_the_known_best_sequence_and_greedy_does_not():
    src = torch.tensor([[7, EOS]])
    greedy = search(TableModel(), src, beam=1)[0][0]
    best = search(TableModel(), src, beam=2)[0][0]
    assert greedy.tokens == [4]
    assert best.tokens == [5]
    assert best.score == pytest.approx(torch.tensor([0.4 * 0.99]).log().item(), abs=1e-5)


def test_length_penalty_formulas():
    assert length_penalty(10, 0.6) == pytest.approx((15 / 6) ** 0.6)
    assert length_penalty(10, 0.6, "plain") == pytest.approx(10 ** 0.6)
    assert length_penalty(7, 0.0) == 1.0


def test_block_ngrams():
    logp = torch.zeros(1, 10)
    block_ngrams(logp, torch.tensor([[4, 5, 6, 4]]), 2, pad=PAD)  # "4 5" seen, last token 4 -> 5 is banned
    assert torch.isinf(logp[0]).nonzero().view(-1).tolist() == [PAD, 5]  # the rest go to pad (-inf in a search)


def test_no_repeat_ngram_in_search():
    model = make(3)
    src = torch.tensor([[5, 6, 7, 8, 9, 10, EOS]])
    hyp = search(model, src, beam=3, max_len_b=20, min_len=15, no_repeat_ngram=2)[0][0].tokens
    bigrams = list(zip(hyp, hyp[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_sampling_is_seeded_and_topk1_is_greedy():
    model = make(4)
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]])
    kw = dict(max_len_a=0.0, max_len_b=12, bos=BOS, eos=EOS, pad=PAD)
    a = sample(model, src, src == PAD, generator=torch.Generator().manual_seed(1), **kw)
    b = sample(model, src, src == PAD, generator=torch.Generator().manual_seed(1), **kw)
    assert [h.tokens for h in a] == [h.tokens for h in b]
    top1 = sample(model, src, src == PAD, top_k=1, **kw)
    greedy = search(model, src, beam=1)
    assert [h.tokens for h in top1] == [g[0].tokens for g in greedy]


def test_decode_config_rejects_nbest_above_beam():
    with pytest.raises(ValueError):
        DecodeConfig(beam=2, nbest=3)


class TokenBias:
    """A model whose logit of `token` is moved by `bias`: for EOS, -1e4 never ends a sentence (to show
    where the length limit cuts), +100 ends it at once."""

    def __init__(self, model, bias, token=EOS):
        self.model, self.cfg, self.bias, self.token = model, model.cfg, bias, token

    def start(self, *args, **kwargs):
        return self.model.start(*args, **kwargs)

    def log_probs(self, tokens, cache):
        logits = self.model.decode_step(tokens, cache).clone()
        logits[:, self.token] += self.bias
        return logits.float().log_softmax(-1)


def test_output_length_limit_is_a_times_source_plus_b():
    model = TokenBias(make(5), -1e4)
    src = torch.tensor([[5, 6, 7, EOS, PAD, PAD], [5, 6, 7, 8, 9, EOS]])  # 3 and 5 pieces, EOS not counted
    expected = [int(1.5 * 3 + 2), int(1.5 * 5 + 2)]  # 6 and 9 pieces, then EOS (as fairseq)
    for beam in (1, 3):
        hyps = search(model, src, beam=beam, max_len_a=1.5, max_len_b=2)
        assert [len(h[0].tokens) for h in hyps] == expected
    sampled = sample(model, src, src == PAD, max_len_a=1.5, max_len_b=2, bos=BOS, eos=EOS, pad=PAD,
                     generator=torch.Generator().manual_seed(0))
    assert [len(h.tokens) for h in sampled] == expected


def test_sampling_respects_min_len():
    model = TokenBias(make(6), 100.0)
    src = torch.tensor([[5, 6, 7, 8, EOS]] * 8)
    kw = dict(max_len_a=0.0, max_len_b=12, bos=BOS, eos=EOS, pad=PAD)
    free = sample(model, src, src == PAD, min_len=1, generator=torch.Generator().manual_seed(0), **kw)
    held = sample(model, src, src == PAD, min_len=4, generator=torch.Generator().manual_seed(0), **kw)
    assert [len(h.tokens) for h in free] == [1] * 8
    assert [len(h.tokens) for h in held] == [4] * 8  # EOS as soon as it is allowed


def test_unk_is_never_emitted_when_forbidden():
    model = TokenBias(make(7), 50.0, token=UNK)  # <unk> is by far the likeliest token
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, 11, EOS, PAD]])
    kw = dict(max_len_a=0.0, max_len_b=8, bos=BOS, eos=EOS, pad=PAD)
    for beam in (1, 3):
        free = [h[0].tokens for h in search(model, src, beam=beam, max_len_b=8)]
        held = [h[0].tokens for h in search(model, src, beam=beam, max_len_b=8, unk=UNK)]
        assert all(UNK in t for t in free), free
        assert all(t and UNK not in t for t in held), held
    gen = torch.Generator().manual_seed(0)
    drawn = sample(model, src.repeat(8, 1), src.repeat(8, 1) == PAD, unk=UNK, generator=gen, **kw)
    assert all(UNK not in h.tokens for h in drawn)
    drawn = sample(model, src.repeat(8, 1), src.repeat(8, 1) == PAD, generator=gen, **kw)
    assert any(UNK in h.tokens for h in drawn)


def joined(model, sources, start_steps, **kw):
    """Each source added to one running BeamSearch when the search has taken start_steps[i] steps;
    the results by sentence, and the most sentences that were live at one step."""
    args = dict(beam=1, lenpen=0.0, max_len_a=0.0, max_len_b=12, min_len=0, bos=BOS, eos=EOS, pad=PAD)
    args.update(kw)
    search = BeamSearch(model, **args)
    results, ids, steps, most = {}, {}, 0, 0
    while len(ids) < len(sources) or len(search):
        for i, src in enumerate(sources):
            if start_steps[i] == steps or (start_steps[i] < steps and i not in ids and not len(search)):
                ids[i], = search.add(src, src == PAD)
        most = max(most, len(search))
        results.update(search.step())
        steps += 1
    return [results[ids[i]] for i in range(len(sources))], most


@pytest.mark.parametrize("kw", [dict(beam=4, nbest=3, lenpen=0.6), dict(beam=1),
                                dict(beam=3, no_repeat_ngram=2, max_len_b=16, min_len=5)])
def test_sentences_that_join_a_running_search_get_what_they_get_alone(kw):
    """Continuous batching: sentences added between steps, with longer and shorter sources than
    those running, end with the hypotheses they have when searched alone."""
    model = make(8)
    sources = [torch.tensor([[5, 6, 7, 8, EOS]]), torch.tensor([[9, 10, EOS]]),
               torch.tensor([[11, 12, 13, 14, 15, 16, 17, EOS]]), torch.tensor([[18, EOS]])]
    together, most = joined(model, sources, [0, 2, 3, 7], **kw)
    assert most >= 3  # they did run side by side
    for src, hyps in zip(sources, together):
        alone = search(model, src, **kw)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-4)


def test_an_ensemble_search_takes_joining_sentences_too():
    from mtrain.ensemble import Ensemble

    ensemble = Ensemble([make(9), make(10)])
    sources = [torch.tensor([[5, 6, 7, 8, EOS]]), torch.tensor([[9, 10, 11, EOS]])]
    together, _ = joined(ensemble, sources, [0, 1], beam=3, nbest=2)
    for src, hyps in zip(sources, together):
        assert [h.tokens for h in hyps] == [h.tokens for h in search(ensemble, src, beam=3, nbest=2)[0]]


class CountWaits(torch.overrides.TorchFunctionMode):
    """Counts the operations that make the host wait for the device, per search step: on a GPU each
    is a synchronisation, and on a CPU they are the same calls. Reading a tensor's values on the host
    (tolist, item, bool, int, float, nonzero) and indexing with a boolean mask or repeating by a
    tensor of counts (whose output size only the device knows)."""

    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.masked_select, torch.masked_select}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            self.count += 1
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            self.count += any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        elif func in (torch.Tensor.repeat_interleave, torch.repeat_interleave):
            self.count += isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
        return func(*args, **kwargs)


def waits_per_step(model, batch: int, beam: int, **kw) -> list[int]:
    torch.manual_seed(batch)
    src = torch.randint(4, 30, (batch, 6))
    src[:, -1] = EOS
    src[1::2, 4:] = PAD  # sentences of two lengths: they finish at different steps and leave
    src[1::2, 3] = EOS
    args = dict(beam=beam, lenpen=0.6, max_len_a=1.0, max_len_b=6, min_len=2, bos=BOS, eos=EOS, pad=PAD)
    search = BeamSearch(model, **{**args, **kw})
    search.add(src, src == PAD)
    counts = []
    while len(search):
        with CountWaits() as waits:
            search.step()
        counts.append(waits.count)
    return counts


@pytest.mark.parametrize("kw", [{}, dict(no_repeat_ngram=2, nbest=2)])
def test_a_step_waits_for_the_device_a_fixed_number_of_times(kw):
    """One wait for what the host must know of every sentence, one more for the tokens of the
    hypotheses that finished, one more when sentences leave (the cache's new size): never one per
    finished hypothesis, per sentence or per beam, as before (an int() and a tolist() for each)."""
    model = make(5)
    small = waits_per_step(model, batch=2, beam=2, **kw)
    large = waits_per_step(model, batch=8, beam=6, **kw)
    assert max(small) <= 3 and max(large) <= 3, (small, large)
    assert min(large) >= 1  # the counter sees the step's one read
