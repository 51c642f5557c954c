"""`mtrain fit`: the training loop, read top to bottom, with validation and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtrain import checkpoint
from mtrain.config import Config, config_to_dict, dump_config
from mtrain.corpus import read_pairs
from mtrain.data import (
    Batches,
    EncodedCorpus,
    collate_corpus,
    load_corpus,
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
from mtrain.model import Transformer
from mtrain.score import bleu
from mtrain.tokenizer import Tokenizers, get_tokenizers
from mtrain.translate import decode_ids


def lr_at(step: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then inverse square root decay (Vaswani et al. 2017 §5.3, rescaled
    so that the peak is a setting: the paper's d^-0.5 * min(s^-0.5, s * w^-1.5) has peak d^-0.5 * w^-0.5)."""
    step, warmup = max(step, 1), max(warmup, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Summed cross-entropy against (1 - eps) one-hot + eps uniform (Szegedy et al. 2016; the paper §5.4).
    Callers pass real tokens only, so padding never reaches the output layer."""
    return F.cross_entropy(logits.float(), target, label_smoothing=eps, reduction="sum")


def batch_loss(model, batch, eps: float, pad: int) -> torch.Tensor:
    """Summed label-smoothed loss of one batch; `model` may be wrapped in DistributedDataParallel."""
    real = batch.tgt_out != pad
    return label_smoothed_loss(model(batch.src, batch.src_pad_mask, batch.tgt_in, real), batch.tgt_out[real], eps)


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
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
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


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    started = run_dir.is_dir() and any(run_dir.glob("*.pt")) or (run_dir / "metrics.jsonl").exists()
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise MtrainError(f"{run_dir}: nothing to resume (no last.pt); start without --resume")
    elif started:
        if not overwrite:
            raise MtrainError(f"{run_dir}: run directory already holds a run; use --resume to continue it "
                              f"or --overwrite to start again")
        for path in [*run_dir.glob("*.pt"), run_dir / "metrics.jsonl"]:
            path.unlink()
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


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
        loss += float(label_smoothed_loss(logits, batch.tgt_out[real], cfg.train.label_smoothing))
        nll += float(F.cross_entropy(logits, batch.tgt_out[real], reduction="sum"))
        tokens += batch.n_tgt_tokens
    n = cfg.data.valid_max_sentences or len(corpus)
    src_ids = [corpus.pair(i)[0] for i in range(min(n, len(corpus)))]
    decode = dataclasses.replace(cfg.decode, beam=cfg.train.valid_beam, nbest=1)
    hyps = toks.tgt.decode_batch([h[0].tokens for h in decode_ids(model, src_ids, decode, toks, dev)])
    model.train()
    return {"valid_loss": loss / tokens, "valid_ppl": math.exp(min(nll / tokens, 50)),
            "valid_bleu": bleu(hyps, refs[:len(hyps)])}


STOP_REASONS = ("", "reached train.max_steps", "reached train.max_epochs", "reached train.max_time",
                "no BLEU gain in train.patience validations", "interrupted")


def fit(cfg: Config, run_dir: Path | str, resume: bool = False, overwrite: bool = False, log=print) -> Path:
    """Train a model as `cfg` says; returns the path of the checkpoint to translate with.
    Under torchrun each process trains one shard of every update (DistributedDataParallel)."""
    world = init_world(cfg.train.device, cfg.train.dist_timeout)
    try:
        final = train(cfg, Path(run_dir), resume, overwrite, log, world)
    except RuntimeError as e:  # torch.distributed errors (DistError and gloo/NCCL failures) are RuntimeErrors
        if world.size == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtrainError(f"process {world.rank}: lost the other processes ({first}); the last checkpoint "
                          f"{Path(run_dir) / 'last.pt'} is intact, continue with --resume") from None
    world.close()
    return final


def train(cfg: Config, run_dir: Path, resume: bool, overwrite: bool, log, world) -> Path:
    """The body of `fit`, for one process of `world`."""
    t0 = time.time()
    tc = cfg.train

    # 1. Device and precision, run directory, seeds.
    dev = pick_device(tc.device, tc.precision, tc.threads, world)
    log = log if world.main else (lambda *_: None)
    if world.main:
        prepare_run_dir(run_dir, resume, overwrite)
        dump_config(cfg, run_dir / "config.yaml")
    log(f"device: {dev.device}, precision {dev.precision}"
        + (f", {torch.get_num_threads()} threads" if dev.device.type == "cpu" else "")
        + (f", {world.size} processes" if world.size > 1 else ""))
    seed_everything(tc.seed + world.rank)

    # 2. Tokenizer and data; rank 0 trains and encodes first, the others then read its files.
    if not world.main:
        world.barrier()
    toks = get_tokenizers(cfg, run_dir, log)
    train_data = load_corpus(cfg.data.train, toks, cfg.data, filtered=True, log=log)
    valid = load_corpus(cfg.data.valid, toks, cfg.data, filtered=False, log=log) if not cfg.data.valid.empty else None
    if world.main:
        world.barrier()
    if len(train_data) == 0:
        raise MtrainError(f"{cfg.data.train.describe()}: no training pairs left after filtering")
    valid_refs = [t for _, t in read_pairs(cfg.data.valid)] if valid is not None else []
    batches = Batches(train_data, tc.batch_tokens, tc.seed)

    # 3. Model, optimizer, schedule.
    model = Transformer(cfg.model, toks.src.vocab_size, toks.tgt.vocab_size, toks.tgt.pad).to(dev.device)
    log(f"model: {model.num_parameters():,} parameters")
    fused = dev.device.type == "cuda"  # one kernel for all parameters instead of one per tensor
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(1, tc.warmup, tc.lr), betas=tuple(tc.betas), eps=tc.eps,
                            weight_decay=tc.weight_decay, fused=fused)
    state = {"step": 0, "best_bleu": -1.0, "bad_valid": 0, "elapsed": 0.0, "kept": []}

    # 4. Resume: everything that decides the next update comes back.
    if resume:
        ckpt = checkpoint.load(run_dir / "last.pt", map_location=dev.device)
        if ckpt["config"]["model"] != config_to_dict(cfg)["model"]:
            raise MtrainError(f"{run_dir / 'last.pt'}: model settings differ from the config; cannot resume")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        dev.scaler.load_state_dict(ckpt["scaler"])
        batches.load_state_dict(ckpt["data"])  # a position in the global batch order: any process count
        state = ckpt["train_state"]
        if world.rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][world.rank])
        else:  # more processes than the run had: fresh, distinct dropout streams
            seed_everything(tc.seed + world.rank + 7919 * state["step"])
        log(f"resumed from step {state['step']} (epoch {batches.epoch})")
    # DDP broadcasts rank 0's weights, then averages gradients during backward.
    train_model = model if world.size == 1 else world.wrap(model, dev.device)

    def save(name: str, rngs: list) -> Path:
        path = run_dir / name
        checkpoint.save(path, {"config": config_to_dict(cfg), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "scaler": dev.scaler.state_dict(),
                               "data": batches.state_dict(), "train_state": state, "rng": rngs,
                               "tokenizer_src": toks.src.proto, "tokenizer_tgt": toks.tgt.proto,
                               "step": state["step"]})
        return path

    def checkpoint_now():
        rngs = world.gather(rng_state())  # every process's RNG, so that each resumes its own stream
        if world.main:
            path = save(f"ckpt_{state['step']}.pt", rngs)
            state["kept"] = [p for p in state["kept"] if p != path.name] + [path.name]
            while len(state["kept"]) > tc.keep_last:
                (run_dir / state["kept"].pop(0)).unlink(missing_ok=True)
            tmp = run_dir / ".last.pt.link"
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)  # last.pt is the same file, not a second copy
            os.replace(tmp, run_dir / "last.pt")

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
            shares = [batches.next_indices() for _ in range(tc.update_freq * world.size)]
            n_tokens = int(sum(batches.tgt_len[i].sum() for i in shares))  # all target tokens of the update
            mine = shares[world.rank * tc.update_freq:(world.rank + 1) * tc.update_freq]
            update_loss = torch.zeros((), device=dev.device)
            for j, indices in enumerate(mine):
                batch = batches.make_batch(indices, pad, bos, eos).to(dev.device)
                # Gradients are all-reduced once per update, on its last batch.
                sync = world.size == 1 or j == len(mine) - 1
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    with dev.autocast():
                        summed = batch_loss(train_model, batch, tc.label_smoothing, pad)
                    # DDP averages gradients over processes; * world.size makes that a sum.
                    dev.scaler.scale(summed * (world.size / n_tokens)).backward()
                update_loss += summed.detach()
            dev.scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm or float("inf"))
            lr = lr_at(state["step"] + 1, tc.warmup, tc.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            if not dev.scaler.is_enabled() and not torch.isfinite(grad_norm):
                # A non-finite loss or gradient: skip this update; the fp16 scaler does the same itself.
                opt.zero_grad(set_to_none=True)
                nonfinite += 1
                bar.write(f"step {state['step'] + 1}: non-finite loss or gradient, update skipped ({nonfinite} in a row)")
                if nonfinite >= tc.max_nonfinite:
                    raise MtrainError(f"training diverged: {nonfinite} non-finite updates in a row; the last good "
                                      f"checkpoint is {run_dir / 'last.pt'} (try a lower train.lr or precision fp32)")
                continue
            nonfinite = 0
            loss_sum += update_loss  # skipped updates stay out of the logged loss
            dev.scaler.step(opt)
            dev.scaler.update()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            tok_count += n_tokens
            bar.update(1)

            step = state["step"]
            record = {}
            if step % tc.log_every == 0:
                now = time.time()
                loss = world.sum(loss_sum) / tok_count  # the only host sync of the loss: once per log interval
                record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_count / (now - interval_start),
                          "epoch": batches.epoch}
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                if bar.disable and world.main:
                    print(f"step {step}: loss {loss:.3f}, lr {lr:.2e}, {record['tokens_per_s']:.0f} tok/s, "
                          f"epoch {batches.epoch}", flush=True)
                loss_sum.zero_()
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
            final = finish(cfg, run_dir, state, valid, valid_refs, toks, dev, log)
    return final


def finish(cfg: Config, run_dir: Path, state: dict, valid, refs, toks, dev, log) -> Path:
    """final.pt: the average of the last checkpoints or the best one, whichever scores higher on valid."""
    final = run_dir / "final.pt"
    candidates = {}
    best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    candidates["best" if best.name == "best.pt" else "last"] = checkpoint.load(best)
    kept = [run_dir / p for p in state["kept"] if (run_dir / p).is_file()][-cfg.train.average_last:]
    if cfg.train.average_last > 1 and len(kept) > 1:
        candidates[f"average of {len(kept)}"] = {**checkpoint.average(kept), "averaged_from": [p.name for p in kept]}
    scores = {}
    for name, ckpt in candidates.items():
        if valid is None or len(candidates) == 1 or name == "best":
            scores[name] = state["best_bleu"]  # the best checkpoint was scored when it was saved
        else:
            model = checkpoint.build_model(ckpt, toks).to(dev.device)
            scores[name] = validate(model, valid, refs, cfg, toks, dev)["valid_bleu"]
        if valid is not None:
            log(f"final candidate {name}: valid BLEU {scores[name]:.2f}")
    choice = max(scores, key=scores.get)
    ckpt = candidates[choice]
    inference = ("config", "model", "tokenizer_src", "tokenizer_tgt", "step", "averaged_from")
    checkpoint.save(final, {k: ckpt[k] for k in inference if k in ckpt} | {"chosen": choice})
    log(f"final.pt = {choice}; translate with: mtrain translate --checkpoint {final}")
    return final
