"""The command line: one thin function per command; user errors become one line on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from mtrain.errors import MtrainError
from mtrain.serve import Limits

# Newer Typer releases carry their own copy of click, with their own exception classes.
USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train and use Transformer translation models.")

QUIET_HELP = "No progress on stderr (by default a bar on a terminal, else a line every 30 s)."


def _quiet(value: bool) -> None:
    from mtrain import progress
    progress.quiet = value


TRUST_HELP = ("Load a checkpoint that holds pickled Python objects (older mtrain versions), or any checkpoint on a "
              "torch older than 2.10; it can run code.")


def versions() -> str:
    """What a bug report needs: mtrain's, torch's and CUDA's versions."""
    import torch

    from mtrain import __version__
    cuda = torch.version.cuda or "none"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"mtrain {__version__}, torch {torch.__version__}, CUDA {cuda}{gpu}"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print mtrain's, torch's and CUDA's versions.")):
    """Train and use Transformer translation models."""


@contextlib.contextmanager
def user_errors():
    """MtrainError -> 'mtrain: message' on stderr, exit 1; anything else is a bug and keeps its traceback."""
    try:
        yield
    except MtrainError as e:
        typer.echo(f"mtrain: {e}", err=True)
        raise typer.Exit(1) from None


CHECKPOINT_OPT_HELP = "The checkpoint, as `translate` takes it (instead of the argument)."


def _one_checkpoint(argument: Optional[Path], options: List[Path], command: str) -> Path:
    """`info` and `export` take one checkpoint as an argument, or as -c/--checkpoint like `translate`
    does (where several make an ensemble, which these do not take)."""
    given = list(dict.fromkeys([*([argument] if argument is not None else []), *options]))
    if len(given) > 1:
        raise click.UsageError(f"{len(given)} checkpoints given ({', '.join(map(str, given))}): {command} takes one "
                               f"(an ensemble is for translate; mtrain average makes one model of several)")
    if not given:
        raise click.UsageError("Missing argument 'CHECKPOINT' (or -c/--checkpoint).")
    return given[0]


def _read_lines(path: Optional[Path]) -> list[str]:
    from mtrain.corpus import open_text
    return list(open_text(path if path is not None else "-"))


def _symbols(text: Optional[str]) -> Optional[list[str]]:
    """--user-symbols a,b, -> [a, b]: a trailing or doubled comma is not a symbol."""
    return [x for x in text.split(",") if x] if text else None


@app.command()
def tokenize(
    input: List[Path] = typer.Option(None, "--input", "-i", help="Text file (plain or .gz); repeat for several."),
    output: Path = typer.Option(None, "--output", "-o", help="Output prefix: writes PREFIX.model and PREFIX.vocab."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary size [8000]."),
    model_type: Optional[str] = typer.Option(None, help="unigram or bpe [unigram]."),
    character_coverage: Optional[float] = typer.Option(None, help="Share of characters covered [1.0]."),
    input_sentence_size: Optional[int] = typer.Option(None, help="Sentences sampled for training [2000000]."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="Take the first sentences instead of a sample."),
    user_symbols: Optional[str] = typer.Option(None, help="Comma-separated symbols kept as single pieces."),
    per_language: bool = typer.Option(False, "--per-language", help="One model per input: PREFIX.<lang>.model."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Take inputs and settings from a config."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. tokenizer.vocab_size=4000."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train a SentencePiece model on raw text and report pieces per sentence and the unknown rate."""
    from mtrain.tokenizer import run_tokenize
    _quiet(quiet)
    with user_errors():
        for line in run_tokenize(inputs=input or [], output=output, config=config, overrides=set_,
                                 per_language=per_language, vocab_size=vocab_size,
                                 model_type=model_type, character_coverage=character_coverage,
                                 input_sentence_size=input_sentence_size, shuffle_input_sentence=False if no_shuffle else None,
                                 user_defined_symbols=_symbols(user_symbols)):
            typer.echo(line)


@app.command("prepare")
def prepare_command(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set data.max_len=200 (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Prepared directory [data.prepared, else data/prepared/CONFIG_NAME]."),
    workers: int = typer.Option(0, help="Encoding processes [0: one per core this process may use]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train the tokenizer and encode every corpus once, into a directory that fit reads (data.prepared)."""
    from mtrain.config import check_trainable, load_config
    from mtrain.prepare import prepare
    _quiet(quiet)
    with user_errors():
        if workers < 0:
            raise MtrainError(f"--workers: must be >= 0, got {workers}")
        cfg = load_config(config, set_)
        check_trainable(cfg, str(config))
        where = output or Path(cfg.data.prepared or Path("data") / "prepared" / config.stem)
        prepare(cfg, where, typer.echo, workers=workers)


@app.command("fit")
def fit_command(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=5e-4 (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory [runs/CONFIG_NAME]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again, deleting the run's checkpoints."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
    init: Optional[Path] = typer.Option(None, "--init", help="Start a new run from this checkpoint's weights and "
                                        "tokenizer (fine-tuning); the optimizer, schedule and data order start afresh."),
):
    """Train a Transformer; the run directory gets checkpoints, metrics.jsonl, config.yaml and the tokenizer."""
    from mtrain.config import check_trainable, load_config
    from mtrain.train import fit
    with user_errors():
        if resume and overwrite:  # one keeps the run, the other deletes it: neither can be guessed
            raise MtrainError("--resume continues the run and --overwrite deletes it: give one of them")
        cfg = load_config(config, set_)
        check_trainable(cfg, str(config))  # before any work: the device, the run directory
        fit(cfg, output or Path("runs") / config.stem, resume=resume, overwrite=overwrite, trust=trust, init=init)


@app.command("config")
def show_config(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, as fit takes it (repeatable)."),
):
    """Print the resolved config (every key, defaults filled in, bases and --set applied) after checking it
    as fit does; runs nothing. fit writes the same text to RUN/config.yaml."""
    from mtrain.config import check_trainable, config_text, load_config
    with user_errors():
        cfg = load_config(config, set_)
        check_trainable(cfg, str(config))
        typer.echo(config_text(cfg), nl=False)


@app.command()
def translate(
    checkpoint: List[Path] = typer.Option(..., "--checkpoint", "-c", help="Checkpoint; several decode as an "
                                          "ensemble (mtrain average makes one model of several)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Source text [stdin]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Translations [stdout]."),
    beam: Optional[int] = typer.Option(None, help="Beam size (1 = greedy) [config decode.beam]."),
    lenpen: Optional[float] = typer.Option(None, help="Length penalty alpha [decode.lenpen]."),
    batch_tokens: Optional[int] = typer.Option(None, help="Source tokens per batch, beam included."),
    nbest: Optional[int] = typer.Option(None, help="Hypotheses per input, as 'INDEX ||| TEXT ||| SCORE' lines."),
    max_len_a: Optional[float] = typer.Option(None, help="Output length <= a * source length + b."),
    max_len_b: Optional[int] = typer.Option(None),
    min_len: Optional[int] = typer.Option(None, help="Minimum output length in pieces."),
    no_repeat_ngram: Optional[int] = typer.Option(None, help="Block repeated n-grams of this size."),
    allow_unk: bool = typer.Option(False, "--allow-unk", help="Let the output hold <unk> (printed ' ⁇ ') "
                                   "[decode.allow_unk]."),
    sample: bool = typer.Option(False, "--sample", help="Sample one translation instead of beam search."),
    top_k: Optional[int] = typer.Option(None, help="Sampling: keep the k most likely tokens (0 = all) [0]."),
    top_p: Optional[float] = typer.Option(None, help="Sampling: nucleus probability mass [1.0]."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature [1.0]."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed [1]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 or auto."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
    alignment: Optional[str] = typer.Option(
        None, "--alignment", help="Append ' ||| ' and Pharaoh alignments (source-target) on pieces; "
                                  "'--alignment words' on words."),
    attention: Optional[Path] = typer.Option(None, "--attention", help="Write cross-attention heatmaps "
                                                                        "DIR/lineN.png (needs matplotlib)."),
    attention_limit: Optional[int] = typer.Option(None, help="Heatmaps for the first N input lines [20]."),
    keep_unknown: bool = typer.Option(False, "--keep-unknown", help="Keep source characters the tokenizer does "
                                      "not know, as <unk>, instead of translating without them."),
    tag: Optional[str] = typer.Option(None, help="A tag the model was trained with, put before every source line "
                                                "(e.g. '<2de>'); mtrain info lists them."),
    buffer_lines: Optional[int] = typer.Option(
        None, help="Lines read, translated (sorted by length) and written at a time [2000; 1 when stdin is "
                   "a terminal]. 1 answers each line before reading the next (a program feeding a pipe)."),
    constraints: Optional[Path] = typer.Option(None, "--constraints", help="Target phrases each output must hold: "
                                               "a line per input line, phrases separated by tabs (docs/terminology.md)."),
    prefix: Optional[Path] = typer.Option(None, "--prefix", help="The text each output begins with: a line per "
                                          "input line (empty: none); the model continues it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Translate a file or stdin with beam search; one output line per input line, flushed per block of lines."""
    from mtrain.translate import run_translate, translate_modes
    _quiet(quiet)
    with user_errors():
        sampling, inspect = translate_modes(
            sample=sample,
            beam_flags={"--beam": beam, "--nbest": nbest, "--lenpen": lenpen, "--no-repeat-ngram": no_repeat_ngram},
            sampling_flags={"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--seed": seed},
            alignment=alignment, attention_dir=attention, attention_limit=attention_limit)
        run_translate(checkpoints=checkpoint, input=input, output=output, device=device, precision=precision,
                      decode_flags=dict(beam=beam, lenpen=lenpen, batch_tokens=batch_tokens, nbest=nbest,
                                        max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len,
                                        no_repeat_ngram=no_repeat_ngram, allow_unk=allow_unk or None),
                      sampling=sampling, trust=trust, inspect=inspect, buffer_lines=buffer_lines,
                      keep_unknown=keep_unknown, tag=tag, constraints=constraints, prefix=prefix)


@app.command()
def score(
    hyp: Optional[Path] = typer.Argument(None, help="Hypotheses [stdin]."),
    ref: List[Path] = typer.Option(..., "--ref", "-r", help="Reference file; repeat for several references."),
    metrics: str = typer.Option("bleu,chrf,ter", help="Comma-separated: bleu, chrf, chrf++, ter."),
    lowercase: bool = typer.Option(False, "--lowercase", "-lc", help="Case-insensitive BLEU and chrF (TER is by default)."),
    tokenize: Optional[str] = typer.Option(None, help="BLEU's tokenizer: 13a, intl, char, zh, none, ... "
                                                   "(sacreBLEU's -tok) [13a]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    compare: Optional[Path] = typer.Option(None, help="A second system: paired bootstrap test against HYP."),
):
    """Score translations with sacreBLEU (BLEU, chrF, TER), with signatures."""
    from mtrain import score as scoring
    with user_errors():
        names = [m.strip().lower() for m in metrics.split(",") if m.strip()]
        given, tokenize = tokenize, tokenize or "13a"
        scoring.build_metrics(names, lowercase, tokenize)  # before reading stdin: a typo fails at once
        scoring.check_options(names, lowercase, given)
        hyps = _read_lines(hyp)
        refs = [_read_lines(r) for r in ref]
        scoring.check_lengths(hyps, refs, str(hyp or "stdin"), [str(r) for r in ref])
        if compare is not None:
            results = scoring.compare(hyps, _read_lines(compare), refs, names, lowercase, tokenize)
            typer.echo(json.dumps(results) if as_json else scoring.comparison_text(results))
            return
        results = scoring.score(hyps, refs, names, lowercase, tokenize)
        if as_json:
            typer.echo(json.dumps({s.name: {"score": round(s.value, 4), "signature": s.signature} for s in results}))
        else:
            for s in results:
                typer.echo(f"{s.text}\n  signature: {s.signature}")


@app.command()
def average(
    checkpoints: List[Path] = typer.Argument(..., help="Checkpoints of one run."),
    output: Path = typer.Option(..., "--output", "-o", help="Averaged checkpoint."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
):
    """Average the weights of several checkpoints into one (Vaswani et al. 2017 average the last 5 or 20)."""
    from mtrain import checkpoint as ckpt
    from mtrain.files import check_parent
    with user_errors():
        check_parent(output, "averaged checkpoint")
        ckpt.check_average_output(output, checkpoints, trust)
        ckpt.save(output, ckpt.average(checkpoints, trust))
        typer.echo(f"averaged {len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)} into {output}")


@app.command()
def info(
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint (.pt) written by mtrain."),
    checkpoint_opt: List[Path] = typer.Option([], "--checkpoint", "-c", help=CHECKPOINT_OPT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, the full config included."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
):
    """What a checkpoint holds: model settings, parameters, step, vocabularies, validation BLEU, averaging."""
    from mtrain.checkpoint import describe, describe_text
    checkpoint = _one_checkpoint(checkpoint, checkpoint_opt, "info")
    with user_errors():
        d = describe(checkpoint, trust)
        typer.echo(json.dumps(d, indent=1) if as_json else describe_text(d))


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="Run directories (with metrics.jsonl); in progress is fine."),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="Picture to write: .png, .svg, .pdf ..."),
):
    """Training curves: loss, validation loss and BLEU, learning rate, against updates and wall time."""
    from mtrain.plot import plot_runs
    with user_errors():
        typer.echo(plot_runs(runs, output))


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint to export (final.pt, or any other)."),
    checkpoint_opt: List[Path] = typer.Option([], "--checkpoint", "-c", help=CHECKPOINT_OPT_HELP),
    fmt: str = typer.Option("ctranslate2", "--format", "-f", help="ctranslate2 or hf (Hugging Face Transformers)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory."),
    ctranslate2: Optional[Path] = typer.Option(None, "--ctranslate2", help="Output directory of a CTranslate2 model "
                                               "(the same as --format ctranslate2 -o DIR)."),
    quantization: Optional[str] = typer.Option(None, help="CTranslate2 weight type: int8, int8_float16, float16..."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
):
    """Export to CTranslate2 (fast inference; needs ctranslate2) or to Hugging Face Transformers
    (AutoModelForSeq2SeqLM and AutoTokenizer load it; needs transformers)."""
    checkpoint = _one_checkpoint(checkpoint, checkpoint_opt, "export")
    with user_errors():
        if fmt not in ("ctranslate2", "hf"):
            raise MtrainError(f"--format {fmt}: expected ctranslate2 or hf")
        if ctranslate2 is not None and (output is not None or fmt != "ctranslate2"):
            raise MtrainError("--ctranslate2 DIR is --format ctranslate2 -o DIR: give one of them")
        output = output or ctranslate2
        if output is None:
            raise MtrainError("--output: give the output directory, e.g. -o exported/")
        if fmt == "hf":
            if quantization is not None:
                raise MtrainError("--quantization is CTranslate2's; a Transformers export is in float32")
            from mtrain.export_hf import export_hf
            typer.echo(export_hf(checkpoint, output, trust))
        else:
            from mtrain.export import export_ctranslate2
            typer.echo(export_ctranslate2(checkpoint, output, quantization, trust))


@app.command()
def serve(
    checkpoints: List[Path] = typer.Argument(..., help="Checkpoint; several decode as an ensemble."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    beam: Optional[int] = typer.Option(None, help="Default beam size of a request [config decode.beam]."),
    max_batch_tokens: int = typer.Option(32768, help="KV-cache positions in flight at most (hypotheses x "
                                                     "output limit): requests join the running search while "
                                                     "they fit; a request that alone needs more is refused."),
    max_wait_ms: float = typer.Option(0.0, help="How long a request to an idle worker waits for others to start "
                                                "with (later ones join the running search anyway)."),
    max_lines: int = typer.Option(Limits.max_lines, help="Lines per request, at most."),
    max_chars: int = typer.Option(Limits.max_chars, help="Characters per line, at most."),
    max_body_bytes: int = typer.Option(Limits.max_body_bytes, help="Request body size, at most."),
    max_queue: int = typer.Option(Limits.max_queue, help="Requests waiting for the worker, at most; more are "
                                                         "refused with 503 and Retry-After."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16, fp16 or auto."),
    trust: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
):
    """Serve translations: a JSON API (POST /translate, GET /health, /info, /docs) and a web page at /
    that shows what the model attended to. Ctrl-C or SIGTERM finish the requests in flight, then exit."""
    from mtrain.serve import run_server
    with user_errors():
        run_server(checkpoints, host, port, beam, max_batch_tokens, max_wait_ms,
                   Limits(max_body_bytes=max_body_bytes, max_lines=max_lines, max_chars=max_chars,
                          max_queue=max_queue), device,
                   precision, trust)


def main() -> None:
    """Entry point: click's usage errors (bad flags, missing files) also become one line."""
    # Batches of varying shapes fragment CUDA's caching allocator; expandable segments let it grow a
    # block instead of keeping many. Read when CUDA first allocates, so set here, before any command
    # runs; a value the user set is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # `--alignment` alone means pieces; Typer options cannot have an optional value, so say it for the user.
    argv = sys.argv
    for n, arg in enumerate(argv):
        if arg == "--alignment" and (n + 1 == len(argv) or argv[n + 1] not in ("pieces", "words")):
            sys.argv = [*argv[:n + 1], "pieces", *argv[n + 1:]]
            break
    try:
        code = app(standalone_mode=False)
    except ABORTS:
        typer.echo("mtrain: aborted", err=True)
        sys.exit(130)
    except USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # plain `mtrain`: the help is an answer, not an error
            typer.echo(e.ctx.get_help() if getattr(e, "ctx", None) else e.format_message())
            sys.exit(0)
        typer.echo(f"mtrain: {e.format_message()}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
