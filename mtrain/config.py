"""Typed configuration: YAML sections become frozen dataclasses, checked before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from mtrain.errors import MtrainError


@dataclass(frozen=True)
class DataSource:
    """One parallel corpus: a pair of text files, a TSV file, or a Hugging Face dataset."""

    src: str = ""  # plain or .gz text, one sentence per line
    tgt: str = ""
    tsv: str = ""  # source<TAB>target per line (plain or .gz)
    hf: str = ""  # `datasets` name on the hub, or a loader such as "json", "csv", "parquet"
    hf_config: str = ""
    hf_split: str = "train"
    hf_data_files: list[str] = field(default_factory=list)  # local files for a loader
    hf_revision: str = ""  # a hub dataset's git revision (tag, branch or commit); "" = the latest
    hf_streaming: bool = False  # read the records as they download instead of the whole split first
    src_key: str = "translation.en"  # dotted path to the source text in a record
    tgt_key: str = "translation.de"
    name: str = ""  # how logs and metrics name it; "" = its files
    weight: float = 1.0  # times its pairs are drawn per epoch (0.5: a different half each epoch)
    tag: str = ""  # a token put before each source sentence (<2de>, <bt>); the tokenizer learns it whole

    def __post_init__(self):
        kinds = sum(bool(x) for x in (self.src or self.tgt, self.tsv, self.hf))
        if kinds > 1:
            raise ValueError("give one of src/tgt, tsv or hf, not several")
        if bool(self.src) != bool(self.tgt):
            raise ValueError("src and tgt must be given together")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.tag and (self.tag != self.tag.strip() or any(c.isspace() for c in self.tag)):
            raise ValueError(f"tag must be one token without spaces, got {self.tag!r}")

    @property
    def label(self) -> str:
        return self.name or self.describe()

    @property
    def empty(self) -> bool:
        return not (self.src or self.tsv or self.hf)

    def describe(self) -> str:
        if self.tsv:
            return self.tsv
        if self.hf:
            return f"datasets:{self.hf}/{self.hf_config or '-'}/{self.hf_split}"
        return f"{self.src} + {self.tgt}"


@dataclass(frozen=True)
class DataConfig:
    train: list[DataSource] = field(default_factory=list)  # one corpus (a mapping) or several (a list)
    valid: DataSource = field(default_factory=DataSource)
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    max_len: int = 128  # tokens per side, longer pairs are dropped from training
    max_len_ratio: float = 3.0  # drop pairs whose token lengths differ more than this factor
    cache_dir: str = "data/cache"  # encoded corpora, keyed by data + tokenizer
    prepared: str = ""  # a directory `mtrain prepare` wrote (fit makes it when missing); "" = cache_dir
    prepare: str = "global"  # who makes a missing `prepared` under torchrun: global rank 0, or per_node
    valid_max_sentences: int = 0  # 0 = decode the whole validation set for BLEU

    def __post_init__(self):
        if self.max_len < 1:
            raise ValueError("max_len must be >= 1")
        if self.max_len_ratio < 1:
            raise ValueError("max_len_ratio must be >= 1")
        if self.valid_max_sentences < 0:
            raise ValueError("valid_max_sentences must be >= 0 (0 = all)")
        labels = [source.label for source in self.train]
        for n, label in enumerate(labels):
            if self.train[n].empty:
                raise ValueError(f"train[{n}] gives no corpus (src/tgt, tsv or hf)")
            if label in labels[:n]:
                raise ValueError(f"train[{n}] is named {label!r} like train[{labels.index(label)}]; give each a "
                                 f"distinct name")
        if self.valid.weight != 1:
            raise ValueError("valid.weight: only training corpora are weighted")
        if self.prepare not in ("global", "per_node"):
            raise ValueError(f"prepare must be global or per_node, got {self.prepare!r}")

    @property
    def tags(self) -> list[str]:
        """The tags of the training and validation corpora, each once, in order."""
        return list(dict.fromkeys(s.tag for s in (*self.train, self.valid) if s.tag))


@dataclass(frozen=True)
class TokenizerConfig:
    model: str = ""  # SentencePiece model (joint, or the source side); "" = RUN_DIR/spm.model (.src.model)
    tgt_model: str = ""  # target-side model when joint is false; "" = next to `model` (or RUN_DIR/spm.tgt.model)
    joint: bool = True  # one model for both languages, which lets the embeddings be shared
    vocab_size: int = 8000
    model_type: str = "unigram"  # unigram (Kudo 2018) or bpe
    character_coverage: float = 1.0
    input_sentence_size: int = 2_000_000  # sentences sampled for training on large corpora; 0 = all
    shuffle_input_sentence: bool = True
    user_defined_symbols: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be unigram or bpe, got {self.model_type!r}")
        if self.vocab_size < 8:
            raise ValueError("vocab_size must be >= 8")
        if not 0 < self.character_coverage <= 1:
            raise ValueError("character_coverage must be in (0, 1]")
        if self.input_sentence_size < 0:
            raise ValueError("input_sentence_size must be >= 0 (0 = every sentence)")
        symbols = [str(x) for x in self.user_defined_symbols]
        if any(not x.strip() for x in symbols) or len(set(symbols)) < len(symbols):
            raise ValueError(f"user_defined_symbols must be distinct and not blank, got {symbols}")


@dataclass(frozen=True)
class ModelConfig:
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_model: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1  # residual dropout, Vaswani et al. 2017 §5.4
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"  # relu (the paper) or gelu
    pre_norm: bool = True  # Xiong et al. 2020; false = the paper's post-norm
    share_embeddings: bool = True  # source, target and output embeddings (Press & Wolf 2017)
    max_positions: int = 1024

    def __post_init__(self):
        for name in ("encoder_layers", "decoder_layers", "d_model", "heads", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if (self.d_model // self.heads) % 2:
            raise ValueError("d_model / heads must be even")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu, got {self.activation!r}")


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    threads: int = 0  # CPU threads; 0 = OMP_NUM_THREADS when set, else every core this process may use
    seed: int = 1
    batch_tokens: int = 4096  # padded tokens of the longer side per batch (fairseq --max-tokens)
    update_freq: int = 1  # batches accumulated per update
    lr: float = 7e-4  # peak learning rate, reached at the end of warm-up
    warmup: int = 4000  # Vaswani et al. 2017 §5.3
    # After warm-up: inverse_sqrt (the paper) never ends; linear and cosine decay to 0 at the end of the
    # budget (max_steps, or the updates max_time allows at the measured speed), which wins under a fixed
    # budget (Li et al. 2020, "Budgeted Training").
    schedule: str = "inverse_sqrt"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # §5.3
    eps: float = 1e-9  # §5.3
    weight_decay: float = 0.0  # AdamW's decoupled decay, of weight matrices and embeddings only
    clip_norm: float = 1.0  # 0 = no clipping
    label_smoothing: float = 0.1  # §5.4
    max_steps: int = 0  # 0 = no limit; steps are optimizer updates
    max_epochs: int = 0
    max_time: str = ""  # wall clock, e.g. 30m, 2h, 90s; "" = no limit
    valid_every: int = 1000
    save_every: int = 1000
    keep_last: int = 5  # periodic checkpoints kept on disk
    average_last: int = 0  # at the end, average this many last checkpoints into final.pt (0 = off)
    # Decay of an exponential moving average of the weights, updated after every update (e.g. 0.999:
    # about the last 1,000 updates weigh); 0 = off. At the end it is one more candidate for final.pt.
    ema: float = 0.0
    patience: int = 0  # validations without BLEU gain before stopping; 0 = off
    log_every: int = 50
    valid_beam: int = 1  # beam for validation BLEU (1 = greedy, fastest)
    max_nonfinite: int = 10  # consecutive non-finite losses before training stops
    prefetch: int = 2  # updates collated ahead in a background thread (0 = in the loop)
    dist_timeout: int = 600  # seconds a process waits at a collective (torchrun) before the job fails

    def __post_init__(self):
        if self.schedule not in ("inverse_sqrt", "linear", "cosine"):
            raise ValueError(f"schedule must be inverse_sqrt, linear or cosine, got {self.schedule!r}")
        if self.schedule != "inverse_sqrt" and not self.max_steps and not self.max_time:
            raise ValueError(f"schedule {self.schedule} decays to 0 at the end of the budget: set max_steps or max_time")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("batch_tokens", "update_freq", "valid_every", "save_every", "log_every",
                     "keep_last", "valid_beam", "max_nonfinite", "dist_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_steps", "max_epochs", "warmup", "patience", "average_last", "threads", "seed", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.clip_norm < 0:
            raise ValueError("clip_norm must be >= 0: the largest gradient norm, 0 = no clipping")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1): the decay per update, 0 = off")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0: the decay per unit of learning rate, 0 = off")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be two numbers in [0, 1)")
        if parse_duration(self.max_time) == 0:  # max_steps 0 means no limit; max_time 0 stopped before step 1
            raise ValueError(f"max_time {self.max_time!r} would stop before the first update; "
                             "'' is no limit, or give a duration such as 30m")

    @property
    def max_seconds(self) -> float:
        return parse_duration(self.max_time)


@dataclass(frozen=True)
class DecodeConfig:
    beam: int = 5
    lenpen: float = 0.6  # alpha of the length penalty
    lenpen_type: str = "gnmt"  # gnmt: ((5+len)/6)^alpha (Wu et al. 2016); plain: len^alpha
    max_len_a: float = 1.5  # output length <= a * source length + b
    max_len_b: int = 10
    min_len: int = 1
    nbest: int = 1
    batch_tokens: int = 6000  # source tokens per decoding batch
    no_repeat_ngram: int = 0  # block repeated n-grams of this size (0 = off)
    # <unk> in the output (printed ' ⁇ '): off by default, as Marian's --allow-unk. A tokenizer with
    # character_coverage below 1 maps rare training characters to <unk>, and the model learns to emit it
    # where a real piece would do.
    allow_unk: bool = False

    def __post_init__(self):
        if self.beam < 1 or self.nbest < 1:
            raise ValueError("beam and nbest must be >= 1")
        if self.nbest > self.beam:
            raise ValueError(f"nbest ({self.nbest}) cannot exceed beam ({self.beam})")
        if self.lenpen_type not in ("gnmt", "plain"):
            raise ValueError("lenpen_type must be gnmt or plain")
        if self.max_len_a < 0 or self.max_len_b < 0 or self.min_len < 0 or self.no_repeat_ngram < 0:
            raise ValueError("max_len_a, max_len_b, min_len and no_repeat_ngram must be >= 0")
        if self.batch_tokens < 1:
            raise ValueError("batch_tokens must be >= 1")
        if not (math.isfinite(self.lenpen) and math.isfinite(self.max_len_a)):  # from translate's flags
            raise ValueError(f"lenpen and max_len_a must be finite, got {self.lenpen} and {self.max_len_a}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self):
        if self.model.share_embeddings and not self.tokenizer.joint:
            raise ValueError("model.share_embeddings needs tokenizer.joint: true (one vocabulary)")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m' or a bare number of seconds; '' means no limit (inf)."""
    if not text:
        return float("inf")
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
    if not parts or not any(parts.groups()):
        raise ValueError(f"cannot read duration {text!r}; write e.g. 90s, 30m, 2h")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check one scalar or list against its annotated type; YAML already parsed it."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # from --set: a,b,c
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise MtrainError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise MtrainError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MtrainError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):  # nan passes every `< 0` check
            raise MtrainError(f"{where}: expected a number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise MtrainError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {hint}")


def _build(cls: type, mapping: Any, where: str):
    """Make dataclass `cls` from a dict, rejecting unknown keys and wrong types, naming `where`."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise MtrainError(f"{where}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in mapping.items():
        key_where = f"{where} {key}" if where.endswith(":") else f"{where}.{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names)})"
            raise MtrainError(f"{key_where}: unknown key{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, key_where)
        elif typing.get_origin(hints[key]) is list and dataclasses.is_dataclass(typing.get_args(hints[key])[0]):
            item = typing.get_args(hints[key])[0]  # one mapping, or a list of them
            items = value if isinstance(value, list) else [value]
            kwargs[key] = [_build(item, v, f"{key_where}[{n}]" if isinstance(value, list) else key_where)
                           for n, v in enumerate(items)]
        else:
            kwargs[key] = _convert(value, hints[key], key_where)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise MtrainError(f"{where.removesuffix(':')}: {e}") from None


# Options the sweeps tried and did not adopt, since removed (docs/sweeps/README.md#removed): each
# with the value that meant "off", which configs and checkpoints from before the removal may hold.
# The model key changes the network; the train keys only how it trained.
REMOVED = {("model", "output_vocab"): "all", ("train", "rdrop"): 0.0, ("train", "subword_alpha"): 0.0,
           ("train", "subword_nbest"): None, ("train", "subword_sides"): None}  # None: any value, once alpha is 0


def drop_removed(raw: Any, source: str, training: bool = True) -> Any:
    """`raw` without the removed options; one that was on is refused with one line naming it (only the
    model's when `training` is False: a checkpoint that trained with R-Drop still translates)."""
    if not isinstance(raw, dict):
        return raw
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for (section, key), off in REMOVED.items():
        part = raw.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        if off is not None and value != off and (training or section == "model"):
            raise MtrainError(f"{source}: {section}.{key}: {value} is an option this version of mtrain removed "
                              "(docs/sweeps/README.md#removed); "
                              + ("the model it describes cannot be built" if section == "model"
                                 else "train without it (a model trained with it still translates)"))
    return raw


def config_from_dict(raw: Any, source: str = "config", training: bool = True) -> Config:
    """Build and check a Config; `source` names the file in error messages. `training` False: a
    checkpoint's config read to translate, which may name train options since removed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MtrainError(f"{source}: expected a mapping with sections data, tokenizer, model, train, decode")
    return _build(Config, drop_removed(raw, source, training), source + ":")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` (value read as YAML) to the raw dict in place."""
    if "=" not in assignment:
        raise MtrainError(f"--set {assignment}: expected KEY=VALUE, e.g. train.lr=5e-4")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise MtrainError(f"--set {key}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the
    last one silently, so a second `train:` section would drop every key of the first without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, whose keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    line = first_line.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: PyYAML's own check below names it
                    continue
                if line != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' given twice, first on line {line + 1}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """One config file's mapping, as written (its `base` not yet followed)."""
    if not path.is_file():
        raise MtrainError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise MtrainError(f"{path}:{line} not valid YAML ({detail})") from None
    if not isinstance(raw, dict):
        raise MtrainError(f"{path}: expected a mapping with sections data, tokenizer, model, train, decode")
    return raw


def merged(base: dict, over: dict) -> dict:
    """`over` written on top of `base`: mappings merge key by key, at every depth; anything else (a
    number, a string, a list such as data.train's corpora) replaces the base's value whole."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file with its `base: OTHER.yaml` (a path relative to the file) read first and this file's
    keys written over it, following bases of bases. One key in the file names what it builds on, so
    the file alone reproduces a run (Marian instead repeats --config on the command line)."""
    raw = read_yaml(path)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise MtrainError(f"{path}: base: expected the path of another config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise MtrainError(f"{path}: base: {base_path} not found")
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*seen, path, base_path))
        raise MtrainError(f"{path}: base: the configs build on each other in a cycle ({names})")
    return merged(read_with_bases(base_path, chain), raw)


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (with its bases; or start from defaults when path is None), apply --set
    overrides, validate."""
    raw: dict = {}
    name = "config"
    if path is not None:
        path = Path(path)
        name = str(path)
        raw = read_with_bases(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = config_from_dict(raw, name)
    # Here, not in Config: a checkpoint's config that trained without meeting it must still load.
    if cfg.data.max_len > cfg.model.max_positions:  # a kept training pair would overflow the positions
        raise MtrainError(f"{name}: data.max_len ({cfg.data.max_len}) exceeds model.max_positions "
                          f"({cfg.model.max_positions})")
    if cfg.train.average_last > cfg.train.keep_last:  # it would average fewer, without a word
        raise MtrainError(f"{name}: train.average_last ({cfg.train.average_last}) exceeds train.keep_last "
                          f"({cfg.train.keep_last}); only kept checkpoints can be averaged: raise keep_last")
    if cfg.tokenizer.tgt_model and cfg.tokenizer.joint:  # it would be ignored
        raise MtrainError(f"{name}: tokenizer.tgt_model is the target side's model when tokenizer.joint is "
                          f"false; with one joint model, give only tokenizer.model")
    if cfg.train.patience and cfg.data.valid.empty:  # it counts validations, and none would run
        raise MtrainError(f"{name}: train.patience stops on validation BLEU, but data.valid gives no validation set")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_text(cfg: Config) -> str:
    """The resolved config as YAML: every key, defaults filled in, bases and overrides applied; what
    `mtrain config` prints and `fit` writes to RUN/config.yaml."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(config_text(cfg), encoding="utf-8")


def check_trainable(cfg: Config, name: str) -> None:
    """What `fit` and `prepare` need beyond a valid config, checked before any work."""
    if not cfg.data.train:
        raise MtrainError(f"{name}: data.train: no training corpus given; write e.g. "
                          "data: {train: {src: train.en, tgt: train.de}}")
