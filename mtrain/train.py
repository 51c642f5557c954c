"""`mtrain fit`: the training loop, read top to bottom, with validation and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mtrain import checkpoint
from mtrain.config import Config, config_to_dict, dump_config
from mtrain.corpus import check_line_counts, read_pairs
from mtrain.data import (
    Batches,
    EncodedCorpus,
    SubwordSampler,
    collate_corpus,
    load_corpus,
    target_vocabulary,
    token_batches,
)
from mtrain.device import (
    Device,
    init_world,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mtrain.errors import MtrainError
from mtrain.files import check_folder, first_names, link_or_copy, make_folder
from mtrain.loss import label_smoothed_loss, output_loss, rdrop_loss
from mtrain.model import Transformer
from mtrain.score import bleu
from mtrain.tokenizer import Tokenizers, get_tokenizers, save_to_run
from mtrain.translate import decode_ids, drop_unknown


def lr_at(step: int, warmup: int, peak: float, schedule: str = "inverse_sqrt", total: int = 0) -> float:
    """Linear warm-up to `peak`, then one of three decays:
    - inverse_sqrt: Vaswani et al. 2017 §5.3, rescaled so that the peak is a setting (the paper's
      d^-0.5 * min(s^-0.5, s * w^-1.5) has peak d^-0.5 * w^-0.5);
    - linear or cosine: from `peak` at the end of warm-up to 0 at update `total` (Li et al. 2020)."""
    step, warmup = max(step, 1), max(warmup, 1)
    if step <= warmup or schedule == "inverse_sqrt":
        return peak * min(step / warmup, math.sqrt(warmup / step))
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


def progress(elapsed_s: float, budget_s: float) -> str:
    """Training time so far, against train.max_time when there is one: '12.5 of 60.0 min'."""
    return f"{elapsed_s / 60:.1f}" + (f" of {budget_s / 60:.1f}" if math.isfinite(budget_s) else "") + " min"


def batch_loss(model, batch, eps: float, pad: int, rdrop: float = 0.0) -> torch.Tensor:
    """Summed training loss of one batch; `model` may be wrapped in DistributedDataParallel."""
    real = batch.tgt_out != pad
    core = getattr(model, "module", model)  # the Transformer under DistributedDataParallel
    target = core.output_columns(batch.tgt_out[real])
    if rdrop:  # the batch twice in one pass, so that the copies draw different dropout masks
        two = lambda t: torch.cat([t, t])  # noqa: E731
        return rdrop_loss(model(two(batch.src), two(batch.src_pad_mask), two(batch.tgt_in), two(real)), target, eps, rdrop)
    if batch.src.device.type == "cpu":
        # On a CPU the output layer and the loss go together in cache-sized chunks (0.55x the time).
        # A GPU keeps the whole logits: not measured there, and under fp16 autocast the gradients that
        # output_loss makes in its forward pass, before the loss scale is applied, could underflow.
        hidden = model(batch.src, batch.src_pad_mask, batch.tgt_in, real, project=False)
        return output_loss(hidden, core.output_weight(), target, eps)
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


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard events (when tensorboard is installed)."""

    def __init__(self, run_dir: Path):
        path = run_dir / "metrics.jsonl"
        torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "a", encoding="utf-8")
        if torn:  # a kill -9 cut the last record: start ours on a fresh line
            self.file.write("\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut by a kill (or being written now) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# What a run writes into its directory, and so all that --overwrite may delete.
RUN_OUTPUTS = re.compile(r"(ckpt_\d+|last|best|final)\.pt|metrics\.jsonl|tensorboard|\..*\.(tmp|link)\d+")
RUN_FILES = re.compile(rf"{RUN_OUTPUTS.pattern}|config\.yaml|spm(\.src|\.tgt)?\.(model|vocab)")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
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
    """Refuse a resume whose config would change the model, the tokenizer or the optimizer's layout:
    checked before the run directory's config.yaml is rewritten, so that a refused resume leaves the
    run as it was."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
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
        target = model.output_columns(batch.tgt_out[real])
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


STOP_REASONS = ("", "reached train.max_steps", "reached train.max_epochs", "reached train.max_time",
                "no BLEU gain in train.patience validations", "interrupted")


def is_lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process died or timed out (DistError, or the gloo and
    NCCL failures older paths raise as plain RuntimeErrors) — not a bug, not out-of-memory."""
    import torch.distributed as dist
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and bool(re.search(
        r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe|peer", str(e), re.IGNORECASE))


def resume_advice(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    if last.is_file():
        return f"the last checkpoint {last} is intact, continue with --resume"
    return "no checkpoint was written yet; start the run again"


def fit(cfg: Config, run_dir: Path | str, resume: bool = False, overwrite: bool = False, log=print,
        trust: bool = False) -> Path:
    """Train a model as `cfg` says; returns the path of the checkpoint to translate with.
    Under torchrun each process trains one shard of every update (DistributedDataParallel)."""
    run_dir = Path(run_dir)
    world = init_world(cfg.train.device, cfg.train.dist_timeout)
    try:
        final = train(cfg, run_dir, resume, overwrite, log, world, trust)
    except torch.OutOfMemoryError:
        tc = cfg.train
        raise MtrainError(f"process {world.rank}: out of memory on {tc.device}; lower train.batch_tokens (now "
                          f"{tc.batch_tokens}) and raise train.update_freq (now {tc.update_freq}) to keep the "
                          f"update size; {resume_advice(run_dir)}") from None
    except RuntimeError as e:
        if world.size == 1 or not is_lost_peer(e):
            raise  # a bug: keep its traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtrainError(f"process {world.rank}: lost the other processes ({first}); "
                          f"{resume_advice(run_dir)}") from None
    world.close()
    return final


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


def restore(ckpt: dict, model, opt, dev: Device, ema, batches: Batches, world, seed: int, log) -> str | None:
    """Everything that decides the next update, back from a checkpoint; returns what makes its data
    position unusable (see Batches.load_state_dict), if anything."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and dev.scaler.is_enabled():  # empty when the run was not fp16 until now
        dev.scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.module.load_state_dict(ckpt["ema"]["model"])
        ema.n_averaged.fill_(ckpt["ema"]["updates"])
    elif ema is not None:
        log("the checkpoint holds no moving average (train.ema was off): it starts from the next update")
    problem = batches.load_state_dict(ckpt["data"])  # a position in the global batch order: any process count
    train_state = ckpt["train_state"]
    if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
        raise ValueError("train_state holds no step")
    if world.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][world.rank])
    else:  # more processes than the run had: fresh, distinct dropout streams
        seed_everything(seed + world.rank + 7919 * train_state["step"])
    return problem


def train(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, log, world, trust: bool = False) -> Path:
    """The body of `fit`, for one process of `world`."""
    t0 = time.time()
    tc = cfg.train

    # 1. Device and precision, run directory, seeds.
    dev = pick_device(tc.device, tc.precision, tc.threads, world)
    log = log if world.main else (lambda *_: None)
    if world.main:
        prepare_run_dir(run_dir, resume, overwrite)
    last = run_dir / "last.pt"
    # Mapped, not read: the checkpoint (the optimizer's moments are twice the weights) costs no memory
    # of its own while the data loads. restore() copies the weights out; on the CPU the optimizer keeps
    # the mapped moments, private copy-on-write pages that its first update writes. Then it is let go.
    ckpt = checkpoint.load(last, trust=trust, mmap=True) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, last)
    log(f"device: {dev.device}, precision {dev.precision}"
        + (f", {torch.get_num_threads()} threads" if dev.device.type == "cpu" else "")
        + (f", {world.size} processes" if world.size > 1 else ""))
    seed_everything(tc.seed + world.rank)

    # 2. Tokenizer and data; rank 0 trains and encodes first, the others then read its files.
    # Mismatched or missing files are named before anything slow (SentencePiece) runs on them.
    if not world.main:
        world.wait_for_preparation()
    for source in (cfg.data.train, cfg.data.valid):
        if source.src and world.main:
            check_line_counts(Path(source.src), Path(source.tgt))
    toks = get_tokenizers(cfg, run_dir, log, write=world.main)
    if ckpt is not None and "tokenizer_src" in ckpt and \
            (ckpt["tokenizer_src"], ckpt.get("tokenizer_tgt")) != (toks.src.proto, toks.tgt.proto):
        where = cfg.tokenizer.model or run_dir / "spm.model"
        raise MtrainError(f"{where}: not the SentencePiece model this run trained with (in {last}); cannot resume")
    train_data = load_corpus(cfg.data.train, toks, cfg.data, filtered=True, log=log)
    valid = load_corpus(cfg.data.valid, toks, cfg.data, filtered=False, log=log) if not cfg.data.valid.empty else None
    if len(train_data) == 0:
        raise MtrainError(f"{cfg.data.train.describe()}: no training pairs left after filtering")
    if valid is not None:  # found now, not at the first validation, hours in (it is not filtered)
        if len(valid) == 0:
            raise MtrainError(f"{cfg.data.valid.describe()}: no validation pairs (every line empty)")
        longest = int(max(valid.src_lengths.max(), valid.tgt_lengths.max()))
        if longest > cfg.model.max_positions:
            raise MtrainError(f"{cfg.data.valid.describe()}: a validation pair has {longest} pieces (EOS "
                              f"included), more than model.max_positions ({cfg.model.max_positions}); shorten "
                              f"it or raise model.max_positions")
        unknown = sum(toks.src.unk in valid.pair(i)[0] for i in range(len(valid)))
        if unknown:
            log(f"data: {unknown} validation source line{'s' * (unknown > 1)} held characters the tokenizer "
                f"does not know; validation translates them without those characters, as `mtrain translate` does")
    if world.main:  # only now, with the data read, does the run directory fill
        make_folder(run_dir, "run directory")
        dump_config(cfg, run_dir / "config.yaml")
        save_to_run(toks, run_dir)
        world.wait_for_preparation()
    valid_refs = [t for _, t in read_pairs(cfg.data.valid)] if valid is not None else []
    sampler = None
    if tc.subword_alpha:
        sampler = SubwordSampler(cfg.data.train, toks, cfg.data, train_data, tc.subword_alpha, tc.subword_nbest,
                                 tc.seed, tc.subword_sides)
        log(f"data: a sampled segmentation each epoch (subword_alpha {tc.subword_alpha}, nbest {tc.subword_nbest}, "
            f"sides {tc.subword_sides})")
    batches = Batches(train_data, tc.batch_tokens, tc.seed, resample=sampler)

    # 3. Model, optimizer, schedule.
    # A resumed run keeps the outputs it was built with (check_resumable: the same output_vocab).
    output_ids = (ckpt["model"].get("output_ids") if ckpt is not None and isinstance(ckpt.get("model"), dict)
                  else None)
    if output_ids is None:
        output_ids = target_vocabulary(cfg.model, train_data, toks.tgt.vocab_size, toks.tgt.eos, toks.tgt.unk)
    model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.tgt.pad, output_ids,
                        toks.tgt.unk).to(dev.device)
    log(f"model: {model.num_parameters():,} parameters"
        + (f"; the output layer scores the {len(output_ids):,} pieces seen in training targets (of "
           f"{toks.tgt.vocab_size:,}; model.output_vocab: seen)" if output_ids is not None else ""))
    # fused: one kernel over all parameters, on CPUs too (torch >= 2.4), instead of a Python loop over
    # them; the step of the Multi30k recipe went from 10.5 to 2.9 ms (of ~250 ms per update).
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=lr_at(1, tc.warmup, tc.lr),
                            betas=tuple(tc.betas), eps=tc.eps, fused=True)
    # plan: the update at which a linear or cosine decay ends (re-estimated under a time budget, and saved
    # so that a resumed run continues the same plan).
    state = {"step": 0, "best_bleu": -1.0, "bad_valid": 0, "elapsed": 0.0, "kept": [],
             "plan": planned_updates(0, 0.0, tc.max_seconds, tc.max_steps) or tc.warmup * 10}
    # An exponential moving average of the weights (train.ema): a copy of the model, lerped towards it
    # after every update by torch's multi-tensor EMA; it starts as a copy at the first update.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema)) if tc.ema else None

    # 4. Resume: everything that decides the next update comes back (checked resumable in 1., 2.).
    if ckpt is not None:
        # On the CPU: RNG states must stay there, and the optimizer moves its state to the weights' device.
        try:  # a checkpoint that loads but lacks a part, or holds a part of the wrong shape or type
            problem = restore(ckpt, model, opt, dev, ema, batches, world, tc.seed, log)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MtrainError(f"{last}: damaged checkpoint, cannot resume ({type(e).__name__}: {detail[:200]}); "
                              f"resume from an older checkpoint (copy it to last.pt) or start again") from None
        if problem:
            raise MtrainError(f"{last}: {problem}, so the saved position in the batch order would "
                              f"skip or repeat data; restore it, or start a new run")
        state = {"plan": tc.max_steps or tc.warmup * 10, **ckpt["train_state"]}
        log(f"resumed from step {state['step']} (epoch {batches.epoch})")
        ckpt = None
    # DDP broadcasts rank 0's weights, then averages gradients during backward.
    train_model = model if world.size == 1 else world.wrap(model, dev.device)

    def save(name: str, rngs: list) -> Path:
        path = run_dir / name
        checkpoint.save(path, {"config": config_to_dict(cfg), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "scaler": dev.scaler.state_dict(),
                               "data": batches.state_dict(), "train_state": state, "rng": rngs,
                               "tokenizer_src": toks.src.proto, "tokenizer_tgt": toks.tgt.proto,
                               "step": state["step"], "ema": ema_state()})
        return path

    def ema_state() -> dict | None:
        if ema is None or not int(ema.n_averaged):
            return None
        return {"model": ema.module.state_dict(), "updates": int(ema.n_averaged)}

    def checkpoint_now():
        rngs = world.gather(rng_state())  # every process's RNG, so that each resumes its own stream
        if world.main:
            name = f"ckpt_{state['step']}.pt"
            # The list saved inside the checkpoint already holds it: a run resumed from it still
            # deletes it in turn and averages it at the end.
            kept = [p for p in state["kept"] if p != name] + [name]
            state["kept"] = kept[-tc.keep_last:]
            path = save(name, rngs)
            for old in kept[:-tc.keep_last]:
                (run_dir / old).unlink(missing_ok=True)
            link_or_copy(path, run_dir / "last.pt")  # the same file (a hard link), not a second copy

    def run_validation(record: dict) -> None:
        """Rank 0 validates and keeps the best checkpoint by BLEU; the others wait."""
        if world.main:
            record.update(validate(model, valid, valid_refs, cfg, toks, dev))
            improved = record["valid_bleu"] > state["best_bleu"]
            state["best_bleu"] = max(state["best_bleu"], record["valid_bleu"])
            state["bad_valid"] = 0 if improved else state["bad_valid"] + 1
            if improved:
                save("best.pt", [rng_state()])
            bar.write(f"step {state['step']}: valid loss {record['valid_loss']:.3f}, ppl {record['valid_ppl']:.2f}, "
                      f"BLEU {record['valid_bleu']:.2f}" + (" (best)" if improved else ""))
        world.barrier()

    # 5. The loop: one iteration is one optimizer update over update_freq x processes batches.
    metrics = MetricsLog(run_dir) if world.main else None
    bar = tqdm(total=tc.max_steps or None, initial=state["step"], unit="step", dynamic_ncols=True,
               disable=None if world.main else True)
    model.train()
    pad, bos, eos = toks.tgt.pad, toks.tgt.bos, toks.tgt.eos
    loss_sum, tok_count, nonfinite = torch.zeros((), device=dev.device), 0, 0
    norms = []  # gradient norms (before clipping) of the updates since the last log line
    interval_start = time.time()
    elapsed_start = state["elapsed"] - time.time()
    with StopRequest() as stop:
        while True:
            reason = 0
            if tc.max_steps and state["step"] >= tc.max_steps:
                reason = 1
            elif tc.max_epochs and batches.epochs_done >= tc.max_epochs:
                reason = 2
            elif elapsed_start + time.time() >= tc.max_seconds:
                reason = 3
            elif tc.patience and state["bad_valid"] >= tc.patience:
                reason = 4
            elif stop.requested:
                reason = 5
            reason = world.max(reason)  # processes stop together, whichever saw a reason first
            if reason:
                break

            # Every process draws the same global batches and keeps its own share, so N processes
            # with update_freq U see exactly the batches of one process with update_freq N x U.
            shares = [batches.next() for _ in range(tc.update_freq * world.size)]
            n_tokens = sum(share.n_tgt_tokens for share in shares)  # all target tokens of the update
            mine = shares[world.rank * tc.update_freq:(world.rank + 1) * tc.update_freq]
            update_loss = torch.zeros((), device=dev.device)
            if not math.isfinite(tc.max_seconds):
                state["plan"] = tc.max_steps  # a pure function of the step
            elif state["step"] % PLAN_EVERY == 0 and state["step"]:
                # Every process must apply the same learning rate: they agree on one plan.
                state["plan"] = world.max(planned_updates(state["step"], elapsed_start + time.time(),
                                                          tc.max_seconds, tc.max_steps))
                bar.total = state["plan"]  # the progress bar's end and time left follow the plan
            # The schedule counts applied updates only.
            lr = lr_at(state["step"] + 1, tc.warmup, tc.lr, tc.schedule, state["plan"])
            for group in opt.param_groups:
                group["lr"] = lr
            for j, share in enumerate(mine):
                batch = share.collate(pad, bos, eos).to(dev.device)
                # Gradients are all-reduced once per update, on its last batch.
                sync = world.size == 1 or j == len(mine) - 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with dev.autocast():
                        summed = batch_loss(train_model, batch, tc.label_smoothing, pad, tc.rdrop)
                    # DDP averages gradients over processes; * world.size makes that a sum.
                    dev.scaler.scale(summed * (world.size / n_tokens)).backward()
                update_loss += summed.detach()
            grad_norm = optimizer_update(opt, model.parameters(), dev.scaler, tc.clip_norm)
            if not math.isfinite(grad_norm):
                nonfinite += 1
                bar.write(f"step {state['step'] + 1}: non-finite loss or gradient, update skipped ({nonfinite} in a row)")
                if nonfinite >= tc.max_nonfinite:
                    raise MtrainError(f"training diverged: {nonfinite} non-finite updates in a row; the last good "
                                      f"checkpoint is {run_dir / 'last.pt'} (try a lower train.lr or precision fp32)")
                continue
            nonfinite = 0
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += update_loss  # skipped updates stay out of the logged loss
            norms.append(grad_norm)
            state["step"] += 1
            tok_count += n_tokens
            bar.update(1)

            step = state["step"]
            record = {}
            if step % tc.log_every == 0:
                now = time.time()
                loss = world.sum(loss_sum) / tok_count  # the only host sync of the loss: once per log interval
                record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_count / (now - interval_start),
                          "epoch": batches.epoch, "grad_norm": sum(norms) / len(norms),
                          "clipped": sum(n > tc.clip_norm for n in norms) / len(norms) if tc.clip_norm else 0.0}
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                gnorm=f"{record['grad_norm']:.2f}")
                if bar.disable and world.main:  # a log file instead of a terminal: how far, in the line
                    print(f"step {step}: loss {loss:.3f}, lr {lr:.2e}, {record['tokens_per_s']:.0f} tok/s, "
                          f"grad norm {record['grad_norm']:.2f}, epoch {batches.epoch}, "
                          f"{progress(elapsed_start + now, tc.max_seconds)}", flush=True)
                loss_sum.zero_()
                norms.clear()
                tok_count, interval_start = 0, now
            if valid is not None and step % tc.valid_every == 0:
                record.setdefault("step", step)
                run_validation(record)
                state["bad_valid"] = world.max(state["bad_valid"])  # rank 0's count reaches every process
            state["elapsed"] = elapsed_start + time.time()
            if record and world.main:
                record["wall_s"] = round(time.time() - t0, 2)
                metrics.write(record)
            if step % tc.save_every == 0:
                checkpoint_now()
            if "valid_bleu" in record:
                interval_start = time.time()  # validation time is not training throughput

    # 6. The end: a last validation and checkpoint, then the checkpoint to translate with.
    bar.close()
    stop_reason = STOP_REASONS[reason]
    log(f"stopped at step {state['step']}: {stop_reason}")
    state["elapsed"] = elapsed_start + time.time()
    if state["step"] and state["step"] % tc.valid_every and valid is not None and reason != 5:
        record = {"step": state["step"]}
        run_validation(record)
        if world.main:
            record["wall_s"] = round(time.time() - t0, 2)
            metrics.write(record)
    if state["step"] % tc.save_every or not (run_dir / "last.pt").is_file():
        checkpoint_now()
    final = run_dir / "last.pt"
    if world.main:
        metrics.close()
        if reason == 5:
            log("checkpoint saved; continue with --resume")
        else:
            final = finish(cfg, run_dir, state, valid, valid_refs, toks, dev, log, ema_state())
    return final


def finish(cfg: Config, run_dir: Path, state: dict, valid, refs, toks, dev, log, ema: dict | None = None) -> Path:
    """final.pt: whichever of the best checkpoint, the average of the last checkpoints and the moving
    average of the weights (train.ema) scores highest on valid. Without a validation set nothing can
    be scored: the average when train.average_last asks for one (the paper's recipe, Vaswani et al.
    2017 §6.1), else the moving average when there is one, else the last checkpoint."""
    final = run_dir / "final.pt"
    kept = [run_dir / p for p in state["kept"] if (run_dir / p).is_file()][-cfg.train.average_last:]
    averaging = cfg.train.average_last > 1 and len(kept) > 1
    average_name = f"average of {len(kept)}"
    ema_name = f"moving average (decay {cfg.train.ema})"

    def averaged() -> dict:
        return {**checkpoint.average(kept), "averaged_from": [p.name for p in kept]}

    def moving_average() -> dict:  # what a checkpoint of the run holds for inference, with the EMA weights
        return {"config": config_to_dict(cfg), "tokenizer_src": toks.src.proto, "tokenizer_tgt": toks.tgt.proto,
                "step": state["step"], "model": ema["model"]}

    score = None
    if valid is None:
        choice, ckpt = ((average_name, averaged()) if averaging else (ema_name, moving_average()) if ema
                        else ("last", checkpoint.load(run_dir / "last.pt")))
        log(f"no validation set: final.pt is the {choice}, unscored")
    else:
        has_best = (run_dir / "best.pt").is_file()
        choice = "best" if has_best else "last"
        ckpt = checkpoint.load(run_dir / f"{choice}.pt", mmap=True)
        score = state["best_bleu"]  # the best checkpoint was scored when it was saved
        log(f"final candidate {choice}: valid BLEU {score:.2f}")
        candidates = ([(average_name, averaged)] if averaging else []) + ([(ema_name, moving_average)] if ema else [])
        for name, make in candidates:
            candidate = make()
            model = checkpoint.build_model(candidate, toks).to(dev.device)
            candidate_score = validate(model, valid, refs, cfg, toks, dev)["valid_bleu"]
            log(f"final candidate {name}: valid BLEU {candidate_score:.2f}")
            if candidate_score > score:
                choice, ckpt, score = name, candidate, candidate_score
    keep = {k: ckpt[k] for k in checkpoint.INFERENCE_KEYS if k in ckpt}
    checkpoint.save(final, keep | {"chosen": choice} | ({"valid_bleu": score} if score is not None else {}))
    log(f"final.pt = {choice}; translate with: mtrain translate --checkpoint {final}")
    return final
