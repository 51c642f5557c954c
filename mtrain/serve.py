"""`mtrain serve`: a JSON translation API and a web page on FastAPI/uvicorn.

Requests are answered by one worker thread that owns the model, with continuous batching: requests
join the running beam search between two of its steps (one search per set of decoding options),
as long as the KV cache they need stays within --max-batch-tokens positions, and each request is
answered as soon as its last line is done, while the others go on. A server is meant to run for
weeks: every request's work and the queue are bounded, and one request's failure is its own. An
idle worker waits up to --max-wait-ms for company before it starts. Lines are read and finished
by the same code as `mtrain translate`'s (read_sources, BeamSearch, EncodedLines.finish). The event
loop only parses, validates and waits, so a slow step never stops the server from accepting or
refusing.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and a string 'Request' naming a class imported inside make_app cannot be resolved.
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from mtrain.errors import MtrainError

log = logging.getLogger("mtrain.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is refused with a 4xx that names the limit."""

    max_body_bytes: int = 1_000_000
    max_lines: int = 64
    max_chars: int = 2000
    max_beam: int = 32
    max_queue: int = 256  # requests waiting for the worker; more get a 503 with Retry-After
    max_constraints: int = 16  # constraint phrases per line

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise MtrainError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


class RequestError(Exception):
    """A bad request: the HTTP status and one line that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Busy(Exception):
    """The queue is full: the request is refused with a 503 and Retry-After."""


# The options a request may set, with their JSON types: `mtrain translate`'s beam-search flags.
# Sampling is left out: a sampled line depends on the random stream of the whole batch it lands in.
OPTIONS = {"beam": int, "nbest": int, "lenpen": float, "max_len_a": float, "max_len_b": int, "min_len": int,
           "no_repeat_ngram": int, "allow_unk": bool}


@dataclass
class Job:
    """One request for the worker: its lines, the options that decide which search it joins, the KV
    cache it takes (`rows` hypotheses, each up to `columns` positions: its beam times its lines, and
    its longest output limit), and where its answer goes. `sources` are its lines made ready to
    decode."""

    lines: list[str]
    key: tuple
    rows: int
    columns: int = 1
    sources: object = None  # translate.EncodedLines
    guides: list | None = None  # per line decoded, its constraints and prefix (guide.Guide or None)
    warnings: dict = field(default_factory=dict)  # line -> what its guide could not do
    hyps: list = field(default_factory=list)  # per line decoded, once its search is done with it
    left: int = 0  # lines still in a search
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Counters:
    requests: int = 0  # answered
    lines: int = 0
    steps: int = 0  # beam-search steps run
    request_steps: int = 0  # requests in flight summed over the steps: / steps is the mean batch
    largest_batch: int = 0  # the most requests one step served
    batched_requests: int = 0  # requests that shared a step with at least one other
    errors: int = 0


class Batcher:
    """The worker thread: admits jobs into `engine` (Translator's decoding, or a stand-in in tests)
    and runs its steps, handing each job its answer when the engine says it is done.

    The engine has `admit(job)`, `step() -> [(job, answer), ...]` (the jobs finished by that step;
    an exception for an answer fails that job alone), `abort()` (forget every admitted job) and
    `decoding()`, a context the worker thread stays in for its whole life.

    The jobs in flight take at most `max_batch_tokens` positions of KV cache: their rows times the
    longest output limit among them (the cache is one rectangle). At most `max_queue` jobs wait."""

    def __init__(self, engine, max_wait_ms: float, max_batch_tokens: int, max_queue: int = Limits.max_queue):
        self.engine, self.max_wait, self.max_tokens = engine, max_wait_ms / 1000, max_batch_tokens
        self.queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self.waiting: list[Job] = []  # taken from the queue, but over the budget when they came
        self.live: list[Job] = []  # admitted, not yet answered
        self.shared: set[int] = set()  # ids of live jobs that shared a step with another
        self.counters = Counters()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mtrain-serve-worker", daemon=True)
        self.stopping = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every job already submitted, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue the job; Busy when `max_queue` jobs wait already."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.queue.maxsize} requests are waiting already") from None
        return job.future

    def load(self, extra: Job | None = None) -> int:
        """KV-cache positions the jobs in flight take (with `extra` too)."""
        jobs = self.live + ([extra] if extra is not None else [])
        return sum(j.rows for j in jobs) * max((j.columns for j in jobs), default=0)

    def _next(self, timeout: float | None) -> Job | None:
        try:
            job = self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self.stopping = True
        return job

    def _admit(self, job: Job) -> bool:
        """Start `job` if it fits the budget beside those in flight (a job alone always does: the
        server refuses one over the budget when it comes)."""
        if self.live and self.load(job) > self.max_tokens:
            return False
        try:
            self.engine.admit(job)
        except Exception as e:
            self._fail([job], e)
            return True
        self.live.append(job)
        return True

    def _take(self) -> None:
        """Admit waiting and queued jobs, oldest first, while they fit. An idle worker blocks for the
        first job and then waits up to max_wait for others, so that they start together."""
        self.waiting = [job for job in self.waiting if not self._admit(job)]
        idle = not self.live
        if idle and not self.stopping:
            job = self._next(None)
            if job is not None and not self._admit(job):
                self.waiting.append(job)
        deadline = time.monotonic() + (self.max_wait if idle else 0)
        while not self.waiting and not self.stopping and self.load() < self.max_tokens:
            job = self._next(deadline - time.monotonic())
            if job is None:
                break
            if not self._admit(job):
                self.waiting.append(job)

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        log.error("translation failed: %s: %s", type(e).__name__, e)
        with self.lock:
            self.counters.errors += 1
        for job in jobs:
            settle(job.future, e)

    def _run(self) -> None:
        with self.engine.decoding():
            self._loop()

    def _loop(self) -> None:
        while True:
            self._take()
            if not self.live:
                if self.stopping and not self.waiting:
                    return
                continue
            n = len(self.live)
            try:
                finished = self.engine.step()
            except Exception as e:  # a model error fails the requests in flight, not the server
                self.engine.abort()
                self._fail(self.live, e)
                self.live, self.shared = [], set()
                continue
            if n > 1:
                self.shared.update(id(j) for j in self.live)
            failed = [(job, answer) for job, answer in finished if isinstance(answer, Exception)]
            finished = [(job, answer) for job, answer in finished if not isinstance(answer, Exception)]
            with self.lock:
                c = self.counters
                c.steps += 1
                c.request_steps += n
                c.largest_batch = max(c.largest_batch, n)
                for job, _ in finished:
                    c.requests += 1
                    c.lines += len(job.lines)
                    c.batched_requests += id(job) in self.shared
            for job, _ in failed + finished:
                self.live.remove(job)
                self.shared.discard(id(job))
            for e in {id(e): e for _, e in failed}.values():  # each error logged once, with its jobs
                self._fail([job for job, error in failed if error is e], e)
            for job, answer in finished:
                settle(job.future, answer)


def settle(future: concurrent.futures.Future, value) -> None:
    """Give a job's future its answer (an exception fails it). A future cancelled meanwhile (a client
    gone, uvicorn shutting down) takes none: set_result would raise InvalidStateError and end the
    worker thread."""
    try:
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _number(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


class Translator:
    """The model, its tokenizers and decode defaults; turns a validated request into its answer."""

    def __init__(self, checkpoints: Sequence[Path], device: str, precision: str, trust: bool, beam: int | None):
        from mtrain.checkpoint import describe, load_models
        from mtrain.device import pick_device
        from mtrain.ensemble import Ensemble
        from mtrain.translate import with_overrides

        self.model, self.toks, self.cfg = load_models(checkpoints, trust)
        self.dev = pick_device(device, precision, setting="--")
        self.model.to(self.dev.device).eval()
        self.ensemble = isinstance(self.model, Ensemble)
        self.decode = with_overrides(self.cfg.decode, beam=beam,
                                     nbest=1 if beam is not None and beam < self.cfg.decode.nbest else None)
        self.tags = list(self.cfg.data.tags)
        self.searches: dict = {}  # key -> BeamSearch running on the worker
        self.owners: dict = {}  # (key, sentence id) -> (job, its line among those decoded)
        self.ready: list[Job] = []  # admitted jobs with nothing to decode
        self.joining: dict = {}  # key -> jobs admitted since the last step, to start at the next
        self.info = {"models": [_without_paths(describe(p, trust)) for p in checkpoints],
                     "ensemble": self.ensemble, "tags": self.tags, "device": str(self.dev.device),
                     "decode": dataclasses.asdict(self.decode)}

    def job(self, body: dict, limits: Limits, max_batch_tokens: int | None = None) -> Job:
        """Validate a parsed request body (RequestError otherwise) and make its job, refused when its
        KV cache alone would be over `max_batch_tokens` positions."""
        from mtrain.translate import tag_piece, with_overrides

        if not isinstance(body, dict):
            raise RequestError(422, f"the body must be a JSON object, got {type(body).__name__}")
        allowed = ["text", "tag", "attention", "constraints", "prefix", *OPTIONS]
        unknown = [k for k in body if k not in allowed]
        if unknown:
            raise RequestError(422, f"unknown option {unknown[0]!r} (the options: {', '.join(allowed)})")
        if "text" not in body:
            raise RequestError(422, "text: missing (a list of lines to translate)")
        text = body["text"]
        if not isinstance(text, list) or not all(isinstance(x, str) for x in text):
            raise RequestError(422, "text: must be a list of strings")
        if not text:
            raise RequestError(422, "text: the list is empty")
        if len(text) > limits.max_lines:
            raise RequestError(413, f"text: {len(text)} lines, over the limit of {limits.max_lines} per request")
        for n, line in enumerate(text):
            if len(line) > limits.max_chars:
                raise RequestError(413, f"text[{n}]: {len(line)} characters, over the limit of {limits.max_chars}")
            if "\n" in line.strip() or "\r" in line.strip():  # translate would read two lines there
                raise RequestError(422, f"text[{n}]: holds a line break; send each line as an item of the list")
            try:  # JSON's \ud800 escapes can make strings that no text encoding holds
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(422, f"text[{n}]: holds an unpaired surrogate (U+{ord(line[e.start]):04X}), "
                                        f"which is not a character") from None
        changes = {}
        for name, kind in OPTIONS.items():
            value = body.get(name)
            if value is None:
                continue
            # JSON has one number type: 5.0 is no beam size, and true is no number (bool is an int in Python).
            ok = isinstance(value, bool) if kind is bool else (
                not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int))
            if not ok:
                wanted = {bool: "true or false", float: "a number", int: "an integer"}[kind]
                raise RequestError(422, f"{name}: must be {wanted}, got {json.dumps(value)}")
            changes[name] = value
        if changes.get("beam", 0) > limits.max_beam:
            raise RequestError(413, f"beam: {changes['beam']}, over the limit of {limits.max_beam}")
        if "beam" in changes and "nbest" not in changes:
            changes["nbest"] = min(self.decode.nbest, changes["beam"])
        try:
            decode = with_overrides(self.decode, **changes)
        except MtrainError as e:
            raise RequestError(422, str(e)) from None
        tag = body.get("tag")
        if tag is not None:
            if not isinstance(tag, str):
                raise RequestError(422, f"tag: must be a string, got {json.dumps(tag)}")
            try:
                tag = tag_piece(tag, self.toks, self.tags, option="tag")
            except MtrainError as e:
                raise RequestError(422, str(e)) from None
        attention = body.get("attention", False)
        if not isinstance(attention, bool):
            raise RequestError(422, f"attention: must be true or false, got {json.dumps(attention)}")
        if attention and self.ensemble:
            raise RequestError(422, "attention: shows one model's attention, and this server decodes with an "
                                    f"ensemble of {len(self.info['models'])}")
        import torch

        from mtrain.search import output_limits
        from mtrain.translate import read_sources

        wishes = self.wishes(body, len(text), limits)
        lines = [line.strip() for line in text]
        sources = read_sources(lines, self.toks, self.model.cfg.max_positions, tag=tag)
        guides, warnings = None, {}
        if wishes is not None:
            from mtrain.translate import line_guides
            try:
                guides, found = line_guides([wishes[i] for i in sources.todo], sources.ids,
                                            [f"line {i}" for i in sources.todo], decode, self.toks,
                                            self.model.cfg.max_positions)
            except MtrainError as e:
                raise RequestError(422, str(e)) from None
            warnings = {i: w for i, w in zip(sources.todo, found) if w}
        # +1: a hypothesis holds BOS and up to its limit of tokens, as BeamSearch's cache is sized
        columns = int(output_limits(torch.tensor([len(x) for x in sources.ids] or [0]), decode.max_len_a,
                                    decode.max_len_b, self.model.cfg.max_positions - 1).max()) + 1
        rows = decode.beam * len(sources.ids)
        if max_batch_tokens is not None and rows * columns > max_batch_tokens:
            raise RequestError(413, f"the request needs {rows * columns:,} positions of KV cache ({len(sources.ids)} "
                                    f"lines x beam {decode.beam} x {columns} output positions), over the server's "
                                    f"--max-batch-tokens {max_batch_tokens:,}; send fewer or shorter lines, or a "
                                    f"smaller beam or max_len_a/b")
        return Job(lines, (dataclasses.astuple(decode), tag, attention), rows, columns, sources, guides, warnings)

    @staticmethod
    def wishes(body: dict, n: int, limits: Limits) -> list | None:
        """The request's `constraints` (per line, a list of target phrases) and `prefix` (per line, a
        string), checked (RequestError otherwise); None when it has neither."""
        from mtrain.guide import Wish
        given = {name: body.get(name) for name in ("constraints", "prefix") if body.get(name) is not None}
        if not given:
            return None
        for name, value in given.items():
            if not isinstance(value, list) or len(value) != n:
                raise RequestError(422, f"{name}: must be a list with one item per line of text ({n})")
        constraints, prefixes = given.get("constraints", [[]] * n), given.get("prefix", [""] * n)
        for i, (phrases, prefix) in enumerate(zip(constraints, prefixes)):
            if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
                raise RequestError(422, f"constraints[{i}]: must be a list of strings")
            if len(phrases) > limits.max_constraints:
                raise RequestError(413, f"constraints[{i}]: {len(phrases)} phrases, over the limit of "
                                        f"{limits.max_constraints} per line")
            if not isinstance(prefix, str):
                raise RequestError(422, f"prefix[{i}]: must be a string")
            for what, value in [*((f"constraints[{i}]", p) for p in phrases), (f"prefix[{i}]", prefix)]:
                if len(value) > limits.max_chars:
                    raise RequestError(413, f"{what}: {len(value)} characters, over the limit of {limits.max_chars}")
                if "\n" in value or "\r" in value or "\t" in value:
                    raise RequestError(422, f"{what}: holds a line break or tab")
        return [Wish(tuple(c), p) for c, p in zip(constraints, prefixes)]

    # The worker's engine (see Batcher): one BeamSearch per key, which jobs with that key join.

    def decoding(self):
        """Where the worker decodes: no autograd and the precision's autocast, entered once for the
        worker's life. Autocast keeps its casts of the weights while its region lasts, so they are
        made once (a copy of the weights in the compute dtype is kept). Entered per step, as it was,
        its exit dropped them and every step cast every weight again; and under inference_mode,
        which the worker used, autocast keeps no casts at all: no_grad it is."""
        import contextlib

        import torch
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(self.dev.autocast())
        return stack

    def admit(self, job: Job) -> None:
        """Queue the job's lines for the search with its options: the next step starts them, with
        those of every job admitted since the last step, in one encoder pass."""
        sources = job.sources
        job.hyps, job.left = [None] * len(sources.ids), len(sources.ids)
        if not sources.ids:  # empty lines alone, or copied through: done at the next step
            self.ready.append(job)
        else:
            self.joining.setdefault(job.key, []).append(job)

    def _start(self) -> list[tuple[Job, Exception]]:
        """Add the queued jobs' lines to their searches (made when there is none); the jobs whose
        lines could not start, with the error."""

        from mtrain.config import DecodeConfig
        from mtrain.search import BeamSearch
        from mtrain.translate import beam_options, source_batch

        failed = []
        for key, jobs in self.joining.items():
            if key not in self.searches:
                self.searches[key] = BeamSearch(self.model, **beam_options(DecodeConfig(*key[0]), self.toks))
            try:
                src = source_batch([ids for job in jobs for ids in job.sources.ids], self.toks, self.dev.device)
                guides = [g for job in jobs for g in (job.guides or [None] * len(job.sources.ids))]
                sentences = iter(self.searches[key].add(src, src == self.toks.src.pad, guides))
            except Exception as e:  # BeamSearch.add changes nothing before the encoder has run
                failed += [(job, e) for job in jobs]
                continue
            for job in jobs:
                for n in range(len(job.sources.ids)):
                    self.owners[key, next(sentences)] = (job, n)
        self.joining = {}
        return failed

    def step(self) -> list[tuple[Job, dict | Exception]]:
        """One step of every search, after the jobs admitted since the last one joined; the jobs
        whose last line is done now, with their answers, and those that failed to start, with the
        error."""

        failed = self._start()
        finished, self.ready = self.ready, []
        for key, search in list(self.searches.items()):
            try:
                done = search.step()
            except Exception as e:  # this search's jobs fail; those of other searches go on
                del self.searches[key]
                mine = [k for k in self.owners if k[0] == key]
                failed += [(job, e) for job in {id(j): j for j, _ in (self.owners.pop(k) for k in mine)}.values()]
                continue
            for sentence, hyps in done:
                job, n = self.owners.pop((key, sentence))
                job.hyps[n] = hyps
                job.left -= 1
                if not job.left:
                    finished.append(job)
            if not len(search):
                del self.searches[key]  # its cache goes with it
        return failed + [(job, self._answer(job)) for job in finished]

    def _answer(self, job: Job) -> dict | Exception:
        """The job's answer, or the error that building it raised (an attention pass out of memory):
        that job's alone."""
        try:
            return self.answer(job)
        except Exception as e:
            return e

    def abort(self) -> None:
        self.searches, self.owners, self.ready, self.joining = {}, {}, [], {}

    def answer(self, job: Job) -> dict:
        """The JSON answer of a job whose lines are all decoded."""
        import torch

        from mtrain.attention import align, alignment_layer, line_attention
        from mtrain.config import DecodeConfig

        decode, tag, attention = job.key
        decode = DecodeConfig(*decode)
        done = job.sources.finish(job.hyps, self.toks)
        maps = {}
        if attention:
            todo = [i for i, d in enumerate(done) if d.hyps]
            # in fp32, as translate --attention computes it (the worker is inside autocast)
            with torch.autocast(self.dev.device.type, enabled=False):
                found = line_attention(self.model, self.toks, [done[i].src_ids for i in todo],
                                       [done[i].hyps[0].tokens for i in todo], tag)
            first = 0 if tag is None else 1
            for i, (w, src, out) in zip(todo, found):
                maps[i] = {"source": [*src, "</s>"], "target": [*out, "</s>"],
                           "weights": [[round(x, 5) for x in row]
                                       for row in w[alignment_layer(w.shape[0])].mean(0).tolist()],
                           "alignment": align(w[..., first:], src_positions=done[i].kept),
                           "source_offset": first}
        items = []
        for i, d in enumerate(done):
            item = {"text": d.texts[0] if d.texts else "", "score": _number(d.scores[0]) if d.scores else None}
            if decode.nbest > 1:
                item["nbest"] = [{"text": t, "score": _number(s)} for t, s in zip(d.texts, d.scores)]
            if attention:
                item["attention"] = maps.get(i)
            if i in job.warnings:
                item["warning"] = job.warnings[i]
            items.append(item)
        if job.guides is not None:
            from mtrain.guide import met
            for i, guide in zip(job.sources.todo, job.guides):
                if guide is not None and guide.constraints:
                    items[i]["constraints_met"] = met(guide, done[i].hyps[0].tokens if done[i].hyps else [])
        return {"translations": items}


def _without_paths(d: dict) -> dict:
    """`mtrain info --json` without what names files on the server's disk."""
    d = {k: v for k, v in d.items() if k not in ("path", "init_from")}
    config = dict(d.get("config") or {})
    data = config.get("data") or {}
    config["data"] = {k: v for k, v in data.items() if k in ("src_lang", "tgt_lang", "max_len")}
    config["tokenizer"] = {k: v for k, v in (config.get("tokenizer") or {}).items() if k != "model"}
    config.pop("train", None)  # paths (cache, init) and nothing a user of the server needs
    d["config"] = config
    return d


def page() -> str:
    return resources.files("mtrain").joinpath("serve_page.html").read_text(encoding="utf-8")


def make_app(translator: Translator, limits: Limits, max_wait_ms: float, max_batch_tokens: int):
    """The FastAPI application; the worker starts and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    batcher = Batcher(translator, max_wait_ms, max_batch_tokens, limits.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()  # after uvicorn has answered the requests in flight

    class TranslateRequest(BaseModel):
        """The request body (the server checks it by hand, to name each problem in one line)."""
        model_config = ConfigDict(extra="forbid")
        text: list[str] = Field(description="Lines to translate", min_length=1)
        tag: Optional[str] = Field(None, description="A tag the model was trained with, e.g. <2de>")
        attention: bool = Field(False, description="Return each line's cross-attention and alignment")
        beam: Optional[int] = None
        nbest: Optional[int] = None
        lenpen: Optional[float] = None
        max_len_a: Optional[float] = None
        max_len_b: Optional[int] = None
        min_len: Optional[int] = None
        no_repeat_ngram: Optional[int] = None
        allow_unk: Optional[bool] = None

    app = FastAPI(title="mtrain", description="Translation with an mtrain model", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(422, "; ".join(e.get("msg", "") for e in exc.errors())[:300])

    @app.exception_handler(Exception)
    async def bug(request, exc):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error(500, f"internal error: {type(exc).__name__}")

    html = page()  # read once, not per request

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return html

    @app.get("/health")
    async def health():
        with batcher.lock:
            counters = dataclasses.asdict(batcher.counters)
        return {"status": "ok", "waiting": batcher.queue.qsize() + len(batcher.waiting),
                "in_flight": len(batcher.live), **counters}

    @app.get("/info")
    async def info():
        return {**translator.info, "limits": dataclasses.asdict(limits), "max_wait_ms": max_wait_ms,
                "max_batch_tokens": max_batch_tokens}

    @app.post("/translate", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": TranslateRequest.model_json_schema()}}}})
    async def translate(request: Request):
        try:
            body = await read_body(request, limits.max_body_bytes)
            job = translator.job(body, limits, max_batch_tokens)
        except RequestError as e:
            return error(e.status, str(e))
        except Exception as e:  # whatever a body makes the parser or the checks raise is the client's error
            return error(400, f"the body cannot be read: {type(e).__name__}: {e}".splitlines()[0][:300])
        try:
            future = batcher.submit(job)
        except Busy as e:
            return JSONResponse({"error": f"the server is busy ({e}); try again shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
        try:
            return await asyncio.wrap_future(future)
        except Exception as e:  # logged once by the worker
            return error(500, f"translation failed: {type(e).__name__}: {e}".splitlines()[0][:300])

    return app


async def read_body(request, limit: int):
    """The parsed JSON body, read no further than `limit` bytes (RequestError otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RequestError(400, 'the body is empty: send a JSON object such as {"text": ["Hello."]}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError(400, "the body is not JSON this server reads: nested too deeply") from None


def _no_constant(name: str):
    """NaN and Infinity are Python's extensions to JSON, not JSON."""
    raise RequestError(400, f"the body is not JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise RequestError(400, f"the body holds the number {text[:40]}, too large for a float")
    return value


def listen(host: str, port: int):
    """A socket bound to host:port (port 0: a free one), or one line saying why it cannot be."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections accepted here inherit TCP_NODELAY. Without it, a client that keeps its connection
    # open (Python's http.client, a pool) waited ~40 ms per answer for its delayed ACK before
    # uvicorn's second write left: 1 client's p50 went from 148 to 89 ms against 100 ms alone.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MtrainError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def run_server(checkpoints: Sequence[Path], host: str, port: int, beam: Optional[int], max_batch_tokens: int,
               max_wait_ms: float, limits: Limits, device: str, precision: str, trust: bool) -> None:
    """`mtrain serve`: load the model(s), then serve until SIGTERM or Ctrl-C, which stop accepting,
    answer the requests in flight and exit."""
    try:
        import uvicorn
    except ImportError:
        raise MtrainError('mtrain serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    if max_wait_ms < 0:
        raise MtrainError(f"--max-wait-ms: must be >= 0, got {max_wait_ms}")
    if max_batch_tokens < 1:
        raise MtrainError(f"--max-batch-tokens: must be >= 1, got {max_batch_tokens}")
    if not checkpoints:
        raise MtrainError("give at least one checkpoint")
    sock = listen(host, port)  # before the model loads: a port in use is said at once
    translator = Translator(checkpoints, device, precision, trust, beam)
    app = make_app(translator, limits, max_wait_ms, max_batch_tokens)
    logging.basicConfig(level=logging.INFO, format="mtrain serve: %(message)s")
    log.info("%s on %s, beam %d; http://%s:%d/", ", ".join(map(str, checkpoints)), translator.dev.device,
             translator.decode.beam, host if ":" not in host else f"[{host}]", sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60))
    server.run(sockets=[sock])
