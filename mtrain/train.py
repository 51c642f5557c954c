"""`mtrain fit`: start the run, prepare the data, build the model, restore or start its state, run the
loop, finish. Each step is a function or a `Trainer` method named for it, in the order it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mtrain import checkpoint
from mtrain.config import Config, config_from_dict, config_to_dict, drop_removed, dump_config
from mtrain.corpus import read_pairs
from mtrain.data import Batches, Corpora, EncodedCorpus, UpdateStream, collate_corpus, load_corpus, token_batches
from mtrain.device import Device, World, init_world, pick_device, rng_state, seed_everything, set_rng_state
from mtrain.encode import tag_id
from mtrain.errors import MtrainError
from mtrain.files import check_folder, first_names, link_or_copy, make_folder
from mtrain.loss import label_smoothed_loss, output_loss
from mtrain.model import Transformer
from mtrain.prepare import MANIFEST, load_prepared, prepare
from mtrain.report import Report, progress, write_line
from mtrain.score import bleu
from mtrain.tokenizer import Tokenizer, Tokenizers, configured_otherwise, get_tokenizers, is_one_piece, save_to_run
from mtrain.translate import decode_ids, drop_unknown

# ---------------------------------------------------------------- the learning rate


def lr_at(step: int, warmup: int, peak: float, schedule: str = "inverse_sqrt", total: int = 0) -> float:
    """Linear warm-up to `peak`, then one of three decays:
    - inverse_sqrt: Vaswani et al. 2017 §5.3, rescaled so that the peak is a setting (the paper's
      d^-0.5 * min(s^-0.5, s * w^-1.5) has peak d^-0.5 * w^-0.5);
    - linear or cosine: from `peak` at the end of warm-up to 0 at update `total` (Li et al. 2020).
      total 0 means not known yet (a time budget before its first estimate): the rate stays at the
      peak. Warm-up takes at most half of `total`, so that a budget shorter than the warm-up decays too."""
    step = max(step, 1)
    if schedule != "inverse_sqrt" and total:
        warmup = min(warmup, total // 2)
    warmup = max(warmup, 1)
    if step <= warmup or schedule == "inverse_sqrt":
        return peak * min(step / warmup, math.sqrt(warmup / step))
    if not total:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_updates(step: int, elapsed_s: float, budget_s: float, max_steps: int) -> int:
    """The update the decay should end at: max_steps, or, under a time budget, the updates done so far
    plus what the remaining time allows at the speed measured over the whole run (validation and
    checkpoints included, since they spend the same budget); the smaller when both are set."""
    plans = [max_steps] if max_steps else []
    if math.isfinite(budget_s) and step > 0 and elapsed_s > 0:
        plans.append(step + int((budget_s - elapsed_s) * step / elapsed_s))
    return max(step + 1, min(plans)) if plans else 0


PLAN_EVERY = 25  # updates between re-estimates of a time budget's plan


# ---------------------------------------------------------------- one update


def batch_loss(model, batch, eps: float) -> torch.Tensor:
    """Summed training loss of one batch; `model` may be wrapped in DistributedDataParallel."""
    real, target = batch.tgt_index, batch.target  # found on the host: no GPU sync
    if batch.src.device.type == "cpu":
        # On a CPU the output layer and the loss go together in cache-sized chunks (0.55x the time).
        # A GPU keeps the whole logits: not measured there, and under fp16 autocast the gradients that
        # output_loss makes in its forward pass, before the loss scale is applied, could underflow.
        core = getattr(model, "module", model)  # the Transformer under DistributedDataParallel
        hidden = model(batch.src, batch.src_pad_mask, batch.tgt_in, real, project=False)
        return output_loss(hidden, core.output.weight, target, eps)
    return label_smoothed_loss(model(batch.src, batch.src_pad_mask, batch.tgt_in, real), target, eps)


# fp16 loss scaling halves the scale after every overflow; ~165 halvings from 2^16 reach 0 and the next
# unscale (1/0) writes NaN into the weights. The floor keeps it finite (fairseq stops at 1e-4 likewise).
MIN_LOSS_SCALE = 2.0 ** -14


def optimizer_update(opt: torch.optim.Optimizer, params, scaler: torch.amp.GradScaler, clip_norm: float) -> float:
    """Apply the accumulated gradients: unscale (fp16), clip, step, reset. Returns the gradient norm
    before clipping; when it is not finite (a non-finite loss or gradient) the weights and optimizer
    state are left untouched. In fp16 that is also how the scaler's overflow skips show up, so every
    precision counts skipped updates alike."""
    scaler.unscale_(opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm or float("inf")))  # the one host sync
    finite = math.isfinite(grad_norm)
    if finite:
        scaler.step(opt)
    if scaler.is_enabled():
        scaler.update()  # halves the scale after an overflow, doubles it after a run of clean updates
        if not finite and scaler.get_scale() < MIN_LOSS_SCALE:
            scaler.update(MIN_LOSS_SCALE)
    opt.zero_grad(set_to_none=True)
    return grad_norm


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups. Weight decay (decoupled, Loshchilov & Hutter 2019) shrinks the weight
    matrices and embeddings only: pulling biases and LayerNorm gains towards 0 works against the
    normalisation rather than regularising (as nanoGPT and Hugging Face's Trainer leave them out).
    Without decay one group, as checkpoints from before this option hold."""
    params = list(model.parameters())  # shared embeddings once
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# ---------------------------------------------------------------- state, stops, clock


@dataclass
class TrainState:
    """What decides the run's course besides the weights, the optimizer and the data position; saved in
    every checkpoint as a plain dict (`state_dict`)."""

    step: int = 0  # applied optimizer updates
    best_bleu: float = -1.0
    bad_valid: int = 0  # validations since the BLEU last improved (train.patience)
    elapsed: float = 0.0  # training seconds of the run, earlier sessions included (train.max_time)
    kept: list[str] = field(default_factory=list)  # periodic checkpoints on disk, oldest first
    plan: int = 0  # the update a linear or cosine decay ends at; 0 until a time budget has an estimate
    init_from: str = ""  # the checkpoint whose weights the run started from (fit --init), if any

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's train_state; a key it lacks (an older checkpoint) keeps its default."""
        if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
            raise ValueError("train_state holds no step")
        for f in dataclasses.fields(self):
            if f.name in saved:
                value = saved[f.name]
                setattr(self, f.name, list(value) if f.name == "kept" else type(getattr(self, f.name))(value))


class Stop(enum.Enum):
    """Why the loop ended, in the order checked; processes agree on the first that any of them saw."""

    MAX_STEPS = "reached train.max_steps"
    MAX_EPOCHS = "reached train.max_epochs"
    MAX_TIME = "reached train.max_time"
    PATIENCE = "no BLEU gain in train.patience validations"
    INTERRUPTED = "interrupted"


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current update and save a checkpoint."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Clock:
    """The one clock: training seconds of the run (those of earlier sessions, from the checkpoint, plus
    this one's), and seconds since this session started."""

    def __init__(self):
        self.session_start = self.origin = time.monotonic()

    def resume_from(self, elapsed: float) -> None:
        self.origin = time.monotonic() - elapsed

    def elapsed(self) -> float:
        return time.monotonic() - self.origin

    def session(self) -> float:
        return time.monotonic() - self.session_start


class Interval:
    """What the updates since the last log line add up to; the loss stays on the device until logged."""

    def __init__(self, device: torch.device, now: float):
        self.loss, self.tokens, self.norms, self.start = torch.zeros((), device=device), 0, [], now

    def add(self, loss: torch.Tensor, tokens: int, grad_norm: float) -> None:
        self.loss += loss
        self.tokens += tokens
        self.norms.append(grad_norm)


# ---------------------------------------------------------------- the run directory and resuming


# What a run writes into its directory, and so all that --overwrite may delete.
RUN_OUTPUTS = re.compile(r"(ckpt_\d+|last|best|final)\.pt|metrics\.jsonl|train\.log|tensorboard|\..*\.(tmp|link)\d+")
RUN_FILES = re.compile(rf"{RUN_OUTPUTS.pattern}|config\.yaml|spm(\.src|\.tgt)?\.(model|vocab)")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A new run needs a new or empty directory, or (with --overwrite) an old mtrain run, of which only
    the files mtrain wrote are deleted; anything else there is never touched. Creates nothing: the
    directory appears once the data has been read without error."""
    check_folder(run_dir, "run directory")
    present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    foreign = [name for name in present if not RUN_FILES.fullmatch(name)]
    started = any(RUN_OUTPUTS.fullmatch(name) for name in present)
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise MtrainError(f"{run_dir}: nothing to resume (no last.pt); start without --resume")
    elif foreign:
        raise MtrainError(f"{run_dir}: holds files mtrain did not write ({first_names(foreign)}); give a new or "
                          f"empty directory with --output")
    elif started:
        if not overwrite:
            raise MtrainError(f"{run_dir}: run directory already holds a run; use --resume to continue it "
                              f"or --overwrite to start again")
        for name in present:
            if RUN_OUTPUTS.fullmatch(name):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def settings_difference(section: str, saved: dict | None, now: dict) -> str:
    """The keys of a config section a resumed run would change, as 'SECTION.KEY: SAVED in the
    checkpoint, NEW in the config'."""
    if not isinstance(saved, dict):
        return f"the checkpoint has no {section} settings"
    keys = [k for k in now if saved.get(k, "missing") != now[k]] + [k for k in saved if k not in now]
    return "; ".join(f"{section}.{k}: {saved.get(k, 'missing')} in the checkpoint, {now.get(k, 'missing')} in the "
                     f"config" for k in keys)


def check_resumable(ckpt: dict, cfg: Config, last: Path) -> None:
    """Refuse a resume whose config would change the model, the tokenizer or the optimizer's layout, or
    whose checkpoint trained with an option mtrain no longer has: checked before the run directory's
    config.yaml is rewritten, so that a refused resume leaves the run as it was."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    saved = drop_removed(saved, str(last), training=True)
    now = config_to_dict(cfg)
    defaults = config_to_dict(Config())
    for section in ("model", "tokenizer"):
        if isinstance(saved.get(section), dict):  # a key added to mtrain since: its default is what the run had
            saved = {**saved, section: {**{k: v for k, v in defaults[section].items() if k not in saved[section]},
                                        **saved[section]}}
        if saved.get(section) != now[section]:
            raise MtrainError(f"{last}: {section} settings differ from the config "
                              f"({settings_difference(section, saved.get(section), now[section])}); cannot resume")
    groups = ckpt["optimizer"].get("param_groups") if isinstance(ckpt.get("optimizer"), dict) else None
    if isinstance(groups, list) and groups and len(groups) != (2 if cfg.train.weight_decay else 1):
        was = "off" if len(groups) == 1 else "on"  # one parameter group without weight decay, two with it
        raise MtrainError(f"{last}: this run trained with train.weight_decay {was}; resume it with the same")


def restore(ckpt: dict, last: Path, trainer: "Trainer", seed: int) -> None:
    """Everything that decides the next update, back from a checkpoint: weights, optimizer, loss scale,
    moving average, data position, train state, this process's random streams."""
    try:  # a checkpoint that loads but lacks a part, or holds a part of the wrong shape or type
        problem = _restore(ckpt, trainer, seed)
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MtrainError(f"{last}: damaged checkpoint, cannot resume ({type(e).__name__}: {detail[:200]}); "
                          f"resume from an older checkpoint (copy it to last.pt) or start again") from None
    if problem:
        raise MtrainError(f"{last}: {problem}, so the saved position in the batch order would "
                          f"skip or repeat data; restore it, or start a new run")
    trainer.report.line(f"resumed from step {trainer.state.step} (epoch {trainer.batches.epoch})")


def _restore(ckpt: dict, t: "Trainer", seed: int) -> str | None:
    """restore() without its error messages; returns what makes the data position unusable, if anything."""
    t.model.load_state_dict(ckpt["model"])
    t.opt.load_state_dict(ckpt["optimizer"])  # on the CPU; the optimizer moves its state to the weights' device
    if ckpt["scaler"] and t.dev.scaler.is_enabled():  # empty when the run was not fp16 until now
        t.dev.scaler.load_state_dict(ckpt["scaler"])
    if t.ema is not None and ckpt.get("ema"):
        t.ema.module.load_state_dict(ckpt["ema"]["model"])
        t.ema.updates = int(ckpt["ema"]["updates"])
    elif t.ema is not None:
        t.report.line("the checkpoint holds no moving average (train.ema was off): it starts from the next update")
    problem = t.batches.load_state_dict(ckpt["data"])  # a position in the global batch order: any process count
    t.state.load_state_dict(ckpt["train_state"])
    t.clock.resume_from(t.state.elapsed)
    if t.world.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][t.world.rank], t.dev.device)
    else:  # more processes than the run had: fresh, distinct dropout streams
        seed_everything(seed + t.world.rank + 7919 * t.state.step)
    return problem


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: Transformer, corpus: EncodedCorpus, refs: list[str], cfg: Config, toks: Tokenizers,
             dev: Device) -> dict:
    """Per-token label-smoothed loss and nll over the validation set, and BLEU of its translations."""
    model.eval()
    loss = nll = tokens = 0.0
    for indices in token_batches(corpus.src_lengths, corpus.tgt_lengths, cfg.train.batch_tokens, 0, 0):
        batch = collate_corpus(corpus, indices, toks.tgt.pad, toks.tgt.bos, toks.tgt.eos).to(dev.device)
        real = batch.tgt_out != model.pad
        with dev.autocast():
            logits = model(batch.src, batch.src_pad_mask, batch.tgt_in, real).float()
        target = batch.tgt_out[real]
        loss += float(label_smoothed_loss(logits, target, cfg.train.label_smoothing))
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        tokens += batch.n_tgt_tokens
    n = cfg.data.valid_max_sentences or len(corpus)
    # Without <unk> pieces, as `mtrain translate` reads the source: validation BLEU is what it will give.
    src_ids, _ = drop_unknown([corpus.pair(i)[0] for i in range(min(n, len(corpus)))], toks.src.unk)
    decode = dataclasses.replace(cfg.decode, beam=cfg.train.valid_beam, nbest=1)
    hyps = toks.tgt.decode_batch([h[0].tokens for h in decode_ids(model, src_ids, decode, toks, dev)])
    model.train()
    return {"valid_loss": loss / tokens, "valid_ppl": math.exp(min(nll / tokens, 50)),
            "valid_bleu": bleu(hyps, refs[:len(hyps)])}


# ---------------------------------------------------------------- fit


def is_lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process died or timed out (DistError, or the gloo and
    NCCL failures older paths raise as plain RuntimeErrors) — not a bug, not out-of-memory."""
    import torch.distributed as dist
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and bool(re.search(
        r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe|peer", str(e), re.IGNORECASE))


def user_error(e: BaseException, cfg: Config, run_dir: Path, world: World) -> MtrainError | None:
    """The one line a failure of `fit` is for its user, or None for a bug (which keeps its traceback)."""
    if isinstance(e, MtrainError):
        return e
    if isinstance(e, torch.OutOfMemoryError):
        train_cfg = cfg.train
        return MtrainError(f"process {world.rank}: out of memory on {train_cfg.device}; lower train.batch_tokens (now "
                           f"{train_cfg.batch_tokens}) and raise train.update_freq (now {train_cfg.update_freq}) to keep the "
                           f"update size; {resume_advice(run_dir)}")
    if isinstance(e, RuntimeError) and world.size > 1 and is_lost_peer(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return MtrainError(f"process {world.rank}: lost the other processes ({first}); {resume_advice(run_dir)}")
    return None


def resume_advice(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    if last.is_file():
        return f"the last checkpoint {last} is intact, continue with --resume"
    return "no checkpoint was written yet; start the run again"


def fit(cfg: Config, run_dir: Path | str, resume: bool = False, overwrite: bool = False, log=write_line,
        trust: bool = False, init: Path | str | None = None) -> Path:
    """Train a model as `cfg` says; returns the path of the checkpoint to translate with. `log` takes
    each line the run reports. Under torchrun each process trains one shard of every update
    (DistributedDataParallel). `init`: a checkpoint whose weights a new run starts from."""
    if init is not None and resume:
        raise MtrainError("--init starts a new run from a checkpoint's weights and --resume continues this run: "
                          "give one of them")
    run_dir = Path(run_dir)
    world = init_world(cfg.train.device, cfg.train.dist_timeout)
    report = Report(log, world.main)
    try:
        final = train(cfg, run_dir, resume=resume, overwrite=overwrite, world=world, trust=trust, report=report,
                      init=init)
    except BaseException as e:
        error = user_error(e, cfg, run_dir, world)
        # the command line prints the error; train.log (once the run has one) keeps it too
        report.to_file(f"mtrain: {error}" if error else "".join(traceback.format_exception(e)).rstrip())
        if error:
            raise error from None
        raise
    finally:
        report.close()
    world.close()
    return final


def train(cfg: Config, run_dir: Path, *, resume: bool, overwrite: bool, world: World, trust: bool,
          report: Report, init: Path | str | None = None) -> Path:
    """The body of `fit`, for one process of `world`."""
    clock = Clock()
    start = load_init(Path(init), cfg, trust) if init is not None else None
    dev, ckpt = start_run(cfg, run_dir, resume=resume, overwrite=overwrite, world=world, trust=trust, report=report)
    toks = start.toks if start else resumed_tokenizers(ckpt, cfg, run_dir) if ckpt is not None else None
    if cfg.data.prepared:
        ensure_prepared(cfg, world=world, report=report, toks=toks)
    with world.main_first():  # rank 0 trains the tokenizer and encodes the corpus; the others read its files
        data = load_training_data(cfg, run_dir, world=world, ckpt=ckpt, report=report, toks=toks)
    trainer = Trainer(cfg, run_dir, world=world, dev=dev, data=data, report=report, clock=clock, init=start)
    start = None  # the model holds its own copy of the weights now: let the mapped file go
    if ckpt is not None:
        restore(ckpt, run_dir / "last.pt", trainer, cfg.train.seed)
        ckpt = None  # let the mapped file go: the model and optimizer hold their own copies now
    # Ctrl-C and SIGTERM ask the loop to stop after its update. The handlers stay until the batch
    # thread has stopped too: torchrun's SIGTERM to the survivors of a lost process then cannot cut
    # short the one line that says what happened.
    with StopRequest() as interrupt:
        try:
            reason = trainer.run(interrupt)
        finally:
            trainer.stream.close()
    return trainer.end(reason, trust=trust)


def start_run(cfg: Config, run_dir: Path, *, resume: bool, overwrite: bool, world: World, trust: bool,
              report: Report) -> tuple[Device, dict | None]:
    """Device and precision; the run directory checked (nothing is created yet); the checkpoint to
    resume from, loaded and checked against the config; seeds."""
    train_cfg = cfg.train
    dev = pick_device(train_cfg.device, train_cfg.precision, train_cfg.threads, world)
    if world.main:
        check_run_dir(run_dir, resume, overwrite)
    ckpt = None
    if resume:
        # Mapped, not read: the checkpoint (the optimizer's moments are twice the weights) costs no memory
        # of its own while the data loads. restore() copies the weights out; on the CPU the optimizer keeps
        # the mapped moments, private copy-on-write pages that its first update writes.
        ckpt = checkpoint.load(run_dir / "last.pt", trust=trust, mmap=True, own=True)
        check_resumable(ckpt, cfg, run_dir / "last.pt")
    report.line(f"device: {dev.device}, precision {dev.precision}"
                + (f", {torch.get_num_threads()} threads" if dev.device.type == "cpu" else "")
                + (f", {world.size} processes" if world.size > 1 else ""))
    seed_everything(train_cfg.seed + world.rank)
    return dev, ckpt


# Under DDP, updates between two agreements on whether to stop (time, patience, a signal): a signal
# waits at most this many updates.
STOP_EVERY = 10


class MovingAverage:
    """An exponential moving average of the weights (train.ema): a copy of the model, lerped towards it
    after every update with one multi-tensor lerp, ema += (1 - decay) (w - ema); it starts as a copy at
    the first update. Its count of updates stays on the host: torch's AveragedModel keeps it on the
    device and reads it back at every update (a synchronisation on a GPU)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy
        self.module = copy.deepcopy(model)
        self.params = list(self.module.parameters())  # once: the update runs after every step
        for p in self.params:
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        theirs = [p.detach() for p in model.parameters()]
        if self.updates:
            torch._foreach_lerp_(self.params, theirs, 1.0 - self.decay)
        else:
            torch._foreach_copy_(self.params, theirs)
        self.updates += 1


@dataclass
class InitCheckpoint:
    """fit --init: the weights a new run starts from, and the tokenizers they were trained with."""

    path: Path
    weights: dict
    toks: Tokenizers


def load_init(path: Path, cfg: Config, trust: bool) -> InitCheckpoint:
    """The checkpoint a new run starts from, checked against the config before anything is created: the
    same model (dropouts aside), its own tokenizer (a config naming another is refused), and every tag
    of the data one piece of it."""
    state = checkpoint.load(path, trust=trust, mmap=True)
    toks = checkpoint.model_and_tokenizers(state, path, model=False)[1]  # the weights load into the Trainer's
    saved = config_from_dict(state["config"], f"{path} config", training=False).model
    for key, now in dataclasses.asdict(cfg.model).items():
        was = getattr(saved, key)
        if "dropout" not in key and now != was:
            raise MtrainError(f"--init {path}: model.{key} is {now} in the config and {was} in the checkpoint; a "
                              f"run that starts from its weights needs its model (dropouts may differ)")
    for key, mine in (("model", toks.src), ("tgt_model", toks.tgt)):
        configured = getattr(cfg.tokenizer, key)
        if configured and Path(configured).is_file() and Tokenizer.load(configured).identity != mine.identity:
            raise MtrainError(f"tokenizer.{key}: {configured} is not the tokenizer of {path}; a run that starts "
                              f"from its weights uses the checkpoint's (leave tokenizer.{key} empty)")
    missing = [tag for tag in cfg.data.tags if not is_one_piece(tag, toks.src)]
    if missing:
        raise MtrainError(f"--init {path}: its tokenizer lacks the tag{'s' * (len(missing) > 1)} "
                          f"{', '.join(missing)} of the data; a model for them must learn them from the start "
                          f"(a tokenizer trained with them)")
    return InitCheckpoint(path, state["model"], toks)


def resumed_tokenizers(ckpt: dict, cfg: Config, run_dir: Path) -> Tokenizers | None:
    """A resumed run's tokenizers are its checkpoint's, never trained again. A configured model file
    that now holds another model is refused: the ids would no longer mean what the weights learnt."""
    if "tokenizer_src" not in ckpt:
        return None
    toks = checkpoint.model_and_tokenizers(ckpt, run_dir / "last.pt", model=False)[1]
    other = configured_otherwise(cfg.tokenizer, toks)
    if other is not None:
        raise MtrainError(f"{other}: not the SentencePiece model this run trained with (in {run_dir / 'last.pt'}); "
                          f"cannot resume")
    return toks


@dataclass
class TrainingData:
    toks: Tokenizers
    batches: Batches  # the training corpus as an endless, resumable stream of batches
    valid: EncodedCorpus | None
    valid_refs: list[str]


def load_training_data(cfg: Config, run_dir: Path, *, world: World, ckpt: dict | None, report: Report,
                 toks: Tokenizers | None = None) -> TrainingData:
    """Tokenizer (`toks`, or the config's, trained when missing) and corpora (encoded once, then cached);
    then the run directory fills."""
    if cfg.data.prepared:
        given = toks
        toks, parts, valid = load_prepared(cfg, Path(cfg.data.prepared), report.line)
        if given is not None and given.identity != toks.identity:
            raise MtrainError(f"{cfg.data.prepared}: prepared with another tokenizer than the run's (from its "
                              f"checkpoint); prepare the data with that tokenizer (tokenizer.model)")
    else:
        toks = toks or get_tokenizers(cfg, run_dir, report.line, write=world.main)
        for source in (*cfg.data.train, cfg.data.valid):  # a tag the tokenizer lacks: named before any encoding
            tag_id(source, toks)
        parts = [load_corpus(source, toks, cfg.data, filtered=True, log=report.line) for source in cfg.data.train]
        valid = None if cfg.data.valid.empty else load_corpus(cfg.data.valid, toks, cfg.data, filtered=False,
                                                              log=report.line)
    train_data = Corpora(parts, [s.weight for s in cfg.data.train], [s.label for s in cfg.data.train])
    if len(train_data) == 0:
        raise MtrainError(f"{', '.join(s.label for s in cfg.data.train)}: no training pairs left after filtering")
    if valid is not None:
        check_valid(valid, cfg, toks, report)
    if world.main:  # only now, with the data read, does the run directory fill
        make_folder(run_dir, "run directory")
        report.open_log(run_dir, resumed_at=ckpt.get("step", 0) if ckpt is not None else None)
        dump_config(cfg, run_dir / "config.yaml")
        save_to_run(toks, run_dir)
    valid_refs = [t for _, t in read_pairs(cfg.data.valid)] if valid is not None else []
    batches = Batches(train_data, cfg.train.batch_tokens, cfg.train.seed, lookahead=cfg.train.prefetch > 0)
    return TrainingData(toks, batches, valid, valid_refs)


def ensure_prepared(cfg: Config, *, world: World, report: Report, toks: Tokenizers | None = None) -> None:
    """data.prepared, made when it is missing (as `mtrain prepare` would) by global rank 0, or with
    data.prepare: per_node by the first process of each node (each node's own disk); every process
    waits for it, then reads it. One that still finds none (another node, without a shared
    filesystem) stops with one line rather than encode the corpus on its own."""
    where = Path(cfg.data.prepared)
    maker = world.local_rank == 0 if cfg.data.prepare == "per_node" else world.main
    if maker and not (where / MANIFEST).is_file():
        prepare(cfg, where, report.line, toks=toks)
    world.wait_for_preparation()


def check_valid(valid: EncodedCorpus, cfg: Config, toks: Tokenizers, report: Report) -> None:
    """The validation set (unfiltered), checked now rather than at the first validation, hours in."""
    if len(valid) == 0:
        raise MtrainError(f"{cfg.data.valid.describe()}: no validation pairs (every line empty)")
    longest = int(max(valid.src_lengths.max(), valid.tgt_lengths.max()))
    if longest > cfg.model.max_positions:
        raise MtrainError(f"{cfg.data.valid.describe()}: a validation pair has {longest} pieces (EOS "
                          f"included), more than model.max_positions ({cfg.model.max_positions}); shorten "
                          f"it or raise model.max_positions")
    unknown = sum(toks.src.unk in valid.pair(i)[0] for i in range(len(valid)))
    if unknown:
        report.line(f"data: {unknown} validation source line{'s' * (unknown > 1)} held characters the tokenizer "
                    f"does not know; validation translates them without those characters, as `mtrain translate` does")


class Trainer:
    """The model, its optimizer and moving average, the data stream, the train state and the clock of one
    process; `run` is the loop, `end` the last validation, checkpoint and final.pt."""

    def __init__(self, cfg: Config, run_dir: Path, *, world: World, dev: Device, data: TrainingData, report: Report,
                 clock: Clock, init: InitCheckpoint | None = None):
        train_cfg, toks = cfg.train, data.toks
        self.cfg, self.run_dir, self.world, self.dev, self.report = cfg, run_dir, world, dev, report
        self.toks, self.batches, self.valid, self.valid_refs = toks, data.batches, data.valid, data.valid_refs
        per_process = train_cfg.update_freq
        self.stream = UpdateStream(data.batches, per_process * world.size,
                                   slice(world.rank * per_process, (world.rank + 1) * per_process),
                                   (toks.tgt.pad, toks.tgt.bos, toks.tgt.eos), dev.device, ahead=train_cfg.prefetch)
        self.model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.tgt.pad).to(dev.device)
        report.line(f"model: {self.model.num_parameters():,} parameters")
        if init is not None:  # before the optimizer and the moving average see the weights
            self.model.load_state_dict(init.weights)
            report.line(f"model: weights from {init.path}; optimizer, schedule and data order start afresh")
        # fused: one kernel over all parameters, on CPUs too (torch >= 2.4), instead of a Python loop over
        # them; the step of the Multi30k recipe went from 10.5 to 2.9 ms (of ~250 ms per update).
        self.opt = torch.optim.AdamW(param_groups(self.model, train_cfg.weight_decay),
                                     lr=lr_at(1, train_cfg.warmup, train_cfg.lr), betas=tuple(train_cfg.betas),
                                     eps=train_cfg.eps, fused=True)
        self.ema = MovingAverage(self.model, train_cfg.ema) if train_cfg.ema else None
        self.state = TrainState(plan=train_cfg.max_steps, init_from=str(init.path) if init else "")
        self.clock = clock
        clock.resume_from(0.0)  # training time starts now, once the data is ready
        self.saved_at = -1  # the step of the last checkpoint this session wrote
        self.nonfinite = 0  # non-finite updates in a row
        self.noted_epoch = 0  # the last epoch whose pairs per corpus were reported

    def run(self, interrupt: StopRequest) -> Stop:
        """The loop: one iteration is one optimizer update over update_freq x processes batches."""
        train_cfg, state = self.cfg.train, self.state
        # DDP broadcasts rank 0's weights, then averages gradients during backward.
        self.train_model = self.model if self.world.size == 1 else self.world.wrap(self.model, self.dev.device)
        self.report.start(self.run_dir, state.step, train_cfg.max_steps)
        if state.step == 0 and state.init_from:  # where the weights came from, first in metrics.jsonl
            self.report.record({"step": 0, "init_from": state.init_from}, self.clock.session())
        self.interval = Interval(self.dev.device, self.clock.elapsed())
        self.model.train()
        while (reason := self.stop_reason(interrupt.requested)) is None:
            lr = self.learning_rate()
            grad_norm, n_tokens, loss = self.update(lr)
            if not math.isfinite(grad_norm):
                self.skip_update()
                continue
            self.nonfinite = 0
            if self.ema is not None:
                self.ema.update(self.model)
            state.step += 1
            self.interval.add(loss, n_tokens, grad_norm)  # skipped updates stay out of the logged loss
            self.report.bar.update(1)
            record = self.log_interval(lr) if state.step % train_cfg.log_every == 0 else {}
            if self.valid is not None and state.step % train_cfg.valid_every == 0:
                record = self.validate(record)
            state.elapsed = self.clock.elapsed()
            self.report.record(record, self.clock.session())
            if state.step % train_cfg.save_every == 0:
                self.save_checkpoint()
        return reason

    def stop_reason(self, interrupted: bool) -> Stop | None:
        train_cfg, state = self.cfg.train, self.state
        seen = [bool(train_cfg.max_steps) and state.step >= train_cfg.max_steps,
                bool(train_cfg.max_epochs) and self.stream.epochs_done >= train_cfg.max_epochs,
                self.clock.elapsed() >= train_cfg.max_seconds,
                bool(train_cfg.patience) and state.bad_valid >= train_cfg.patience,
                interrupted]
        mine = next((n + 1 for n, hit in enumerate(seen) if hit), 0)
        if self.world.size == 1:
            return list(Stop)[mine - 1] if mine else None
        # Processes stop together, whichever saw a reason first. The step and epoch limits are the same
        # on every process; the others (time, patience, a signal) are agreed on by an all-reduce, every
        # STOP_EVERY updates rather than at each: each one waits for the device and the slowest process.
        if not (seen[0] or seen[1]) and state.step % STOP_EVERY:
            return None
        agreed = self.world.max(mine)
        return list(Stop)[agreed - 1] if agreed else None

    def learning_rate(self) -> float:
        """The rate of the next update; under a time budget the decay's end is re-estimated as it trains."""
        train_cfg, state = self.cfg.train, self.state
        if not math.isfinite(train_cfg.max_seconds):
            state.plan = train_cfg.max_steps  # a pure function of the step
        elif state.step and state.step % PLAN_EVERY == 0:
            # Every process must apply the same learning rate: they agree on one plan.
            state.plan = self.world.max(planned_updates(state.step, self.clock.elapsed(), train_cfg.max_seconds,
                                                        train_cfg.max_steps))
            self.report.bar.total = state.plan  # the progress bar's end and time left follow the plan
        # counts applied updates only
        return lr_at(state.step + 1, train_cfg.warmup, train_cfg.lr, train_cfg.schedule, state.plan)

    def update(self, lr: float) -> tuple[float, int, torch.Tensor]:
        """One optimizer update. Returns the gradient norm before clipping (not finite: nothing was
        applied), the target tokens of the whole update, and this process's summed loss."""
        train_cfg, world, dev = self.cfg.train, self.world, self.dev
        update = self.stream.next()  # this process's share of the update's batches, collated ahead
        self.note_epoch(update)
        n_tokens = update.n_tokens  # all target tokens of the update, every process's share
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = torch.zeros((), device=dev.device)
        for j, batch in enumerate(update.batches):
            # Gradients are all-reduced once per update, on its last batch.
            sync = world.size == 1 or j == len(update.batches) - 1
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                with dev.autocast():
                    summed = batch_loss(self.train_model, batch, train_cfg.label_smoothing)
                # DDP averages gradients over processes; * world.size makes that a sum.
                dev.scaler.scale(summed * (world.size / n_tokens)).backward()
            loss += summed.detach()
        return optimizer_update(self.opt, self.model.parameters(), dev.scaler, train_cfg.clip_norm), n_tokens, loss

    def note_epoch(self, update) -> None:
        """With several corpora or weights, the pairs each gave to an epoch, once per epoch."""
        corpora, epoch = self.batches.corpus, update.epoch
        if epoch == self.noted_epoch or (len(corpora.parts) == 1 and corpora.weights == [1.0]):
            return
        self.noted_epoch = epoch
        pairs = update.epoch_pairs
        self.report.line(f"epoch {epoch}: " + ", ".join(f"{name} {n:,} pairs" for name, n in pairs.items()))
        self.report.record({"step": self.state.step, "epoch": epoch, "epoch_pairs": pairs}, self.clock.session())

    def skip_update(self) -> None:
        self.nonfinite += 1
        self.report.line(f"step {self.state.step + 1}: non-finite loss or gradient, update skipped "
                         f"({self.nonfinite} in a row)")
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            raise MtrainError(f"training diverged: {self.nonfinite} non-finite updates in a row; the last good "
                              f"checkpoint is {self.run_dir / 'last.pt'} (try a lower train.lr or precision fp32)")

    def log_interval(self, lr: float) -> dict:
        train_cfg, interval, step = self.cfg.train, self.interval, self.state.step
        now = self.clock.elapsed()
        loss = self.world.sum(interval.loss) / interval.tokens  # the only host sync of the loss: once per log interval
        norms = interval.norms
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": interval.tokens / max(now - interval.start, 1e-9),
                  "epoch": self.stream.epoch, "grad_norm": sum(norms) / len(norms),
                  "clipped": sum(n > train_cfg.clip_norm for n in norms) / len(norms) if train_cfg.clip_norm else 0.0}
        if self.report.on_terminal:
            self.report.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                        gnorm=f"{record['grad_norm']:.2f}")
        else:  # a log file instead of a terminal: how far, in the line
            self.report.line(f"step {step}: loss {loss:.3f}, lr {lr:.2e}, {record['tokens_per_s']:.0f} tok/s, "
                             f"grad norm {record['grad_norm']:.2f}, epoch {self.stream.epoch}, "
                             f"{progress(now, train_cfg.max_seconds)}")
        self.interval = Interval(self.dev.device, now)
        return record

    def validate(self, record: dict) -> dict:
        """Rank 0 validates and keeps the best checkpoint by BLEU; the others wait, then learn its count
        of validations without gain (train.patience)."""
        state = self.state
        record = {"step": state.step, **record}
        if self.world.main:
            record.update(validate(self.model, self.valid, self.valid_refs, self.cfg, self.toks, self.dev))
            improved = record["valid_bleu"] > state.best_bleu
            state.best_bleu = max(state.best_bleu, record["valid_bleu"])
            state.bad_valid = 0 if improved else state.bad_valid + 1
            if improved:
                self.save("best.pt", [rng_state(self.dev.device)])
            self.report.line(f"step {state.step}: valid loss {record['valid_loss']:.3f}, ppl "
                             f"{record['valid_ppl']:.2f}, BLEU {record['valid_bleu']:.2f}" + (" (best)" * improved))
        self.world.wait_for_main_work()
        state.bad_valid = self.world.max(state.bad_valid)
        self.interval.start = self.clock.elapsed()  # validation time is not training throughput
        return record

    def save(self, name: str, rngs: list) -> Path:
        path = self.run_dir / name
        ema = ({"model": self.ema.module.state_dict(), "updates": self.ema.updates}
               if self.ema is not None and self.ema.updates else None)
        checkpoint.save(path, {"config": config_to_dict(self.cfg), "model": self.model.state_dict(),
                               "optimizer": self.opt.state_dict(), "scaler": self.dev.scaler.state_dict(),
                               "data": self.stream.state_dict(), "train_state": self.state.state_dict(),
                               "rng": rngs, "tokenizer_src": self.toks.src.proto,
                               "tokenizer_tgt": self.toks.tgt.proto, "step": self.state.step, "ema": ema,
                               "init_from": self.state.init_from or None})
        return path

    def save_checkpoint(self) -> None:
        """ckpt_STEP.pt, linked as last.pt; the oldest beyond train.keep_last are deleted."""
        rngs = self.world.gather(rng_state(self.dev.device))  # every process's RNG: each resumes its own stream
        self.saved_at = self.state.step
        if not self.world.main:
            self.world.wait_for_main_work()  # here, not in the next update's collective (train.dist_timeout)
            return
        keep_last, name = self.cfg.train.keep_last, f"ckpt_{self.state.step}.pt"
        # The list saved inside the checkpoint already holds it: a run resumed from it still deletes it
        # in turn and averages it at the end.
        kept = [p for p in self.state.kept if p != name] + [name]
        self.state.kept = kept[-keep_last:]
        path = self.save(name, rngs)
        for old in kept[:-keep_last]:
            (self.run_dir / old).unlink(missing_ok=True)
        link_or_copy(path, self.run_dir / "last.pt")  # the same file (a hard link), not a second copy
        self.world.wait_for_main_work()

    def end(self, reason: Stop, trust: bool) -> Path:
        """A last validation and checkpoint (what they found reaches last.pt, so a resume that extends the
        run compares against it), then final.pt; an interrupted run only saves, to be resumed."""
        state, train_cfg = self.state, self.cfg.train
        self.report.bar.close()
        self.report.line(f"stopped at step {state.step}: {reason.value}")
        validated = False
        if reason is not Stop.INTERRUPTED and self.valid is not None and state.step and state.step % train_cfg.valid_every:
            state.elapsed = self.clock.elapsed()
            self.report.record(self.validate({}), self.clock.session())
            validated = True
        state.elapsed = self.clock.elapsed()
        unsaved = validated or self.saved_at != state.step or not (self.run_dir / "last.pt").is_file()
        if self.world.max(unsaved):  # every process takes part in a save: they agree on rank 0's view too
            self.save_checkpoint()
        self.report.end_training()
        if not self.world.main:
            return self.run_dir / "last.pt"
        if reason is Stop.INTERRUPTED:
            self.report.line("checkpoint saved; continue with --resume")
            return self.run_dir / "last.pt"
        ema = self.ema.module.state_dict() if self.ema is not None and self.ema.updates else None
        return finish(self.cfg, self.run_dir, self.state, self.valid, self.valid_refs, self.toks, self.dev,
                      log=self.report.line, ema=ema, trust=trust)


# ---------------------------------------------------------------- final.pt


def finish(cfg: Config, run_dir: Path, state: TrainState, valid, refs, toks, dev, *, log, ema: dict | None,
           trust: bool) -> Path:
    """final.pt: whichever of the best checkpoint, the average of the last checkpoints and the moving
    average of the weights (train.ema) scores highest on valid. Without a validation set nothing can
    be scored: the average when train.average_last asks for one (the paper's recipe, Vaswani et al.
    2017 §6.1), else the moving average when there is one, else the last checkpoint. `trust` is
    fit's --trust-checkpoint: a resumed older-format run's checkpoints need it here too."""
    kept = [run_dir / p for p in state.kept if (run_dir / p).is_file()][-cfg.train.average_last:]
    candidates = {}  # name -> a function that makes the candidate's checkpoint
    if cfg.train.average_last > 1 and len(kept) > 1:
        candidates[f"average of {len(kept)}"] = lambda: {**checkpoint.average(kept, trust=trust, own=True),
                                                          "averaged_from": [p.name for p in kept]}
    if ema is not None:  # what a checkpoint of the run holds for inference, with the moving average's weights
        candidates[f"moving average (decay {cfg.train.ema})"] = lambda: {
            "config": config_to_dict(cfg), "tokenizer_src": toks.src.proto, "tokenizer_tgt": toks.tgt.proto,
            "step": state.step, "model": ema}
    score = None
    if valid is None:
        choice = next(iter(candidates), "last")
        ckpt = candidates[choice]() if candidates else checkpoint.load(run_dir / "last.pt", trust=trust, own=True)
        log(f"no validation set: final.pt is the {choice}, unscored")
    else:
        choice = "best" if (run_dir / "best.pt").is_file() else "last"
        ckpt = checkpoint.load(run_dir / f"{choice}.pt", mmap=True, trust=trust, own=True)
        score = state.best_bleu  # the best checkpoint was scored when it was saved
        log(f"final candidate {choice}: valid BLEU {score:.2f}")
        for name, make in candidates.items():
            candidate = make()
            model = checkpoint.build_model(candidate, toks).to(dev.device)
            candidate_score = validate(model, valid, refs, cfg, toks, dev)["valid_bleu"]
            log(f"final candidate {name}: valid BLEU {candidate_score:.2f}")
            if candidate_score > score:
                choice, ckpt, score = name, candidate, candidate_score
    final = run_dir / "final.pt"
    keep = {k: ckpt[k] for k in checkpoint.INFERENCE_KEYS if k in ckpt}
    checkpoint.save(final, keep | {"chosen": choice} | ({"valid_bleu": score} if score is not None else {}))
    log(f"final.pt = {choice}; translate with: mtrain translate --checkpoint {final}")
    return final
