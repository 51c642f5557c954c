"""The precision matrix of decoding: every decoding path gives fp32's text under bf16 and fp16
autocast. CPU autocast mixes dtypes as CUDA autocast does (matmuls in half precision, softmax and
norms in fp32, the KV cache in the compute dtype), so this is as close as the suite gets to a GPU
without one; a GPU's `precision: auto` is bf16.

"The same text" allows what half precision cannot decide: where two outputs score within TIE of
each other in fp32, either may win in bf16. Each best output that differs must be such a near-tie,
scored again in fp32, and at most a tenth of them may differ. The lower ranks of an n-best list
hold whatever the beam kept on its way, and one pruning decision that flips early changes them: they
must score within 10% of fp32's at the same rank, as every output must."""

import pytest
import torch
from conftest import SAMPLE_EN, forced_score

from mtrain import checkpoint
from mtrain.config import DecodeConfig
from mtrain.device import Device, pick_device
from mtrain.ensemble import Ensemble
from mtrain.search import BeamSearch, Hypothesis
from mtrain.translate import Inspect, Sampling, beam_options, source_batch, tag_piece, translate_lines, translate_texts

LINES = SAMPLE_EN.read_text().splitlines()
FP32 = pick_device("cpu", "fp32")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
TIE = 0.1  # fp32 score difference within which half precision may pick either output


def device(precision: str) -> Device:
    """CPU autocast in bf16 or fp16, as pick_device gives a GPU (it refuses both on a CPU without
    native bf16, where emulation is slow, but they compute the same)."""
    if precision == "fp32":
        return FP32
    return Device(torch.device("cpu"), HALF[precision], torch.amp.GradScaler("cpu", enabled=False))


@pytest.fixture(scope="module")
def tagged(tagged_model):
    model, toks, cfg = checkpoint.load_for_inference([tagged_model])
    return model, toks, tag_piece("<2de>", toks, cfg.data.tags)


def fp32_score(model, toks, tag, line: str, tokens: list[int], decode: DecodeConfig, sampled: bool) -> float:
    """The score an output of `line` gets in fp32, forced (no length penalty for sampling)."""
    return forced_score(model, toks, [tag, *toks.src.encode_batch([line])[0]], tokens,
                        0.0 if sampled else decode.lenpen, decode.lenpen_type)


def assert_same_or_near_ties(tagged, want: list[list[Hypothesis]], got: list[list[Hypothesis]],
                             decode: DecodeConfig, sampled: bool = False) -> None:
    model, toks, tag = tagged
    differ = 0
    for line, w, g in zip(LINES, want, got, strict=True):
        assert len(w) == len(g)
        for hw, hg in zip(w, g):
            assert hg.score == pytest.approx(hw.score, rel=0.1, abs=0.05), line
        if w[0].tokens != g[0].tokens:
            differ += 1
            ours, theirs = (fp32_score(model, toks, tag, line, h.tokens, decode, sampled) for h in (w[0], g[0]))
            assert abs(ours - theirs) <= TIE, (line, toks.tgt.decode_batch([w[0].tokens, g[0].tokens]), ours, theirs)
    assert differ <= len(LINES) // 10, f"{differ} best outputs differ"


def hyps(model, toks, tag, dev, decode, sampling=None):
    done = translate_texts(LINES, model, toks, decode, dev, sampling, tag=tag)
    return [d.hyps for d in done]


PATHS = {  # name -> (decode settings, sampling, an ensemble (the model twice) instead of the model)
    "greedy": (DecodeConfig(beam=1), False, False),
    "beam": (DecodeConfig(beam=4), False, False),
    "nbest": (DecodeConfig(beam=4, nbest=3), False, False),
    "sampling": (DecodeConfig(beam=1), True, False),  # nucleus 0.5 of a peaked model: ties are rare
    "ensemble beam": (DecodeConfig(beam=3), False, True),
    "ensemble sampling": (DecodeConfig(beam=1), True, True),
}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_decoding_path_gives_fp32s_text_under_autocast(tagged, path, precision):
    model, toks, tag = tagged
    decode, sampled, ensemble = PATHS[path]
    m = Ensemble([model, model]) if ensemble else model
    runs = [hyps(m, toks, tag, dev, decode, Sampling(top_p=0.5, seed=3) if sampled else None)
            for dev in (FP32, device(precision))]  # a generator each: both draw the same stream
    assert_same_or_near_ties(tagged, *runs, decode, sampled)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_alignments_under_autocast_are_fp32s(tagged, precision):
    """--alignment after a search under autocast: the same text and, where the text is the same, the
    same alignment (it is computed from the output, in fp32)."""
    model, toks, tag = tagged
    decode = DecodeConfig(beam=2)
    want, got = (list(translate_lines(LINES, model, toks, decode, dev, inspect=Inspect("words"), tag=tag))
                 for dev in (FP32, device(precision)))
    same = [(w, g) for w, g in zip(want, got) if w.split(" ||| ")[0] == g.split(" ||| ")[0]]
    assert len(same) >= len(LINES) - len(LINES) // 10 and all(w == g for w, g in same)
    assert all(len(g.split(" ||| ")[1].split()) > 0 for g in got)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sentences_that_join_a_running_search_under_autocast_get_fp32s_text(tagged, precision):
    """The server's engine: sentences added to a running search at different steps (the ragged KV
    cache writes that crashed under bf16) end with the output of a fp32 file translation."""
    model, toks, tag = tagged
    dev, decode = device(precision), DecodeConfig(beam=3)
    search = BeamSearch(model, **beam_options(decode, toks))
    ids, results, step = {}, {}, 0
    with torch.inference_mode():
        while len(ids) < len(LINES) or len(search):
            with dev.autocast():
                if step < len(LINES):  # one line joins at each step, the others still running
                    src = source_batch([[tag, *toks.src.encode_batch([LINES[step]])[0]]], toks, torch.device("cpu"))
                    ids[step], = search.add(src, src == toks.src.pad)
                    if precision != "fp32":
                        assert search.cache.self_k[0].dtype == HALF[precision]
                results.update(search.step())
            step += 1
    assert_same_or_near_ties(tagged, hyps(model, toks, tag, FP32, decode), [results[ids[i]] for i in range(len(LINES))],
                             decode)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_server_under_autocast_answers_as_fp32_translate_does(tagged_model, tagged, precision):
    """Concurrent requests to a bf16/fp16 server (16 x 500 before: a joining sentence crashed the
    cache write), each with translate's fp32 output."""
    pytest.importorskip("fastapi")
    from concurrent.futures import ThreadPoolExecutor

    from mtrain.serve import Batcher, Limits, Translator
    model, toks, tag = tagged
    translator = Translator([tagged_model], "cpu", "fp32", False, 2)
    translator.dev = device(precision)
    decode = DecodeConfig(beam=2)
    batcher = Batcher(translator, max_wait_ms=0, max_batch_tokens=100_000)
    batcher.start()
    try:
        jobs = [translator.job({"text": [line], "tag": "<2de>"}, Limits()) for line in LINES]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda j: batcher.submit(j).result(timeout=120), jobs))
    finally:
        batcher.stop()
    got = [[Hypothesis(toks.tgt.encode_batch([a["translations"][0]["text"]])[0], a["translations"][0]["score"])]
           for a in answers]
    assert_same_or_near_ties(tagged, hyps(model, toks, tag, FP32, decode), got, decode)
    assert batcher.counters.errors == 0 and batcher.counters.largest_batch > 1  # they did share steps


def weight_casts(step, shapes) -> int:
    """The copies step() makes of tensors shaped like the model's weights, as the profiler sees them
    (autocast's casts are below the reach of a Python dispatch mode)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
               and tuple(e.input_shapes[0]) in shapes)


def test_the_server_casts_the_weights_once_not_at_every_step(tagged_model):
    """The worker decodes inside one autocast region for its life: the decoder and output weights are
    cast to bf16 at the first step and reused (entered per step, the region's exit dropped the casts
    and every step made them again)."""
    pytest.importorskip("fastapi")
    from mtrain.serve import Limits, Translator
    translator = Translator([tagged_model], "cpu", "fp32", False, 2)
    translator.dev = device("bf16")
    shapes = {tuple(p.shape) for p in translator.model.decoder.parameters() if p.dim() == 2}
    with translator.decoding():
        translator.admit(translator.job({"text": LINES[:4], "tag": "<2de>"}, Limits()))
        casts = [weight_casts(translator.step, shapes) for _ in range(4)]
    assert casts[0] >= len(shapes) and casts[1:] == [0, 0, 0], casts
