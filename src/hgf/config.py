"""One config tree for everything: nested dataclasses, TOML presets, ``--section.key=value`` overrides.

Precedence (lowest to highest): dataclass defaults < the named model size (``model.size``) <
the TOML file < command-line overrides. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one line naming the key and the file.

Every project decision the paper leaves open ([D] in docs/METHOD.md) is a field here with its
default documented next to it.
"""

from __future__ import annotations

import json
import keyword
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hgf.errors import HGFError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(HGFError, ValueError):
    """A bad configuration value; the message is one line naming the key and its source."""


# Named model sizes. ``debug`` trains in seconds on a CPU; ``paper`` is the ~25M-parameter model of
# docs/METHOD.md §2 (with a 4096-token vocabulary); ``base100m`` is the inference benchmark size;
# ``1b``/``3b`` are planning sizes for multi-GPU runs.
SIZES: dict[str, dict[str, int]] = {
    "debug": dict(d_model=64, n_layers=2, n_heads=4, d_ff=192, max_seq_len=128),
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256),
    "small": dict(d_model=256, n_layers=6, n_heads=8, d_ff=768, max_seq_len=256),
    "paper": dict(d_model=512, n_layers=6, n_heads=8, d_ff=1536, max_seq_len=512),
    "base100m": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=1024),
    "1b": dict(d_model=2048, n_layers=20, n_heads=16, d_ff=5632, max_seq_len=2048),
    "3b": dict(d_model=3072, n_layers=24, n_heads=24, d_ff=8192, max_seq_len=2048),
}


@dataclass
class ModelConfig:
    """Architecture. ``linear`` and ``attention`` are the two orthogonal variant axes."""

    size: str = "debug"  # a key of SIZES; its values sit below anything the TOML/CLI sets
    vocab_size: int = 4096
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4  # standard heads; differential attention uses n_heads // 2 (METHOD §3)
    n_kv_heads: int = 0  # key/value heads: 0 = n_heads; fewer = grouped-query (standard attention)
    d_ff: int = 192  # hidden width of the gated MLP
    max_seq_len: int = 128
    linear: str = "dense"  # dense | bitlinear | hgf | tequila | sherry | ptqtp (`hgf convert --to ptqtp`)
    attention: str = "standard"  # standard | differential
    mlp: str = "swiglu"  # swiglu | relu2 (squared-ReLU GLU, BitNet b1.58 2B4T)
    subln: str = "auto"  # auto (on for ternary linears) | on | off
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class QuantConfig:
    """BitNet b1.58 quantizers (METHOD §3)."""

    weight_eps: float = 1e-5  # clamp of mean|W| before 1/mean|W|
    act_eps: float = 1e-5  # clamp of max|x| before 127/max|x|
    act_bits: int = 8  # per-token absmax activation bits


@dataclass
class HGFConfig:
    """The gated low-rank correction of HGFLinear. All [D] in docs/METHOD.md unless noted."""

    rank: int = 8  # low-rank r; ignored when target_overhead > 0
    target_overhead: float = 0.0  # >0: derive r from this overhead fraction (see hgf.memory)
    overhead_bits: float = 2.0  # bits/weight of the backbone used for target_overhead
    targets: str = "all"  # attention | mlp | all: which projections carry a correction
    gate: str = "sigmoid"  # sigmoid | raw | tanh parameterization of the per-projection gate
    gate_mode: str = "scalar"  # scalar (one per projection) | channel (one per output channel)
    # | input (per token: φ(wᵀ T(x) + α) of the ternary stream's output; cannot be exported)
    gate_init: float = 0.1  # g0; the paper's gates settle near 0.1 [S3]
    fusion: str = "additive"  # additive: T + g·C | convex: (1-g)·T + g·C
    init: str = "kaiming"  # kaiming (A Kaiming-uniform, B zeros) | svd (residual SVD, LoftQ-like)
    gate_lr_mult: float = 1.0  # gate learning rate = train.lr × this (own group, no weight decay)
    lr_mult: float = 1.0  # A/B learning rate = train.lr × this
    decay: bool = True  # apply train.weight_decay to A and B (as to the backbone weights)
    gate_l2: float = 0.0  # weight of the L2 pull  gate_l2 · Σ (g - gate_target)²  added to the loss
    gate_target: float = 0.1
    gate_warmup_frac: float = 0.0  # upper clamp on g ramps from gate_init to 1 over this fraction
    gate_freeze_frac: float = 1.0  # gates stop changing after this fraction of steps (1 = never)


@dataclass
class TequilaConfig:
    """Tequila's dead-zone bias (hgf.model.tequila, docs/METHODS.md)."""

    bias_scale: float = 1e-3  # λ in b = λ·Σ_dead W (the released recipe's eps)
    learn_scale: bool = False  # true: λ is a learned scalar per projection


@dataclass
class SherryConfig:
    """Sherry's 3:4 sparse ternary and its Arenas residual (hgf.model.sherry, docs/METHODS.md)."""

    arenas: bool = True  # the annealed full-precision residual ε(t)·x Wᵀ while training
    arenas_max: float = 1.0  # ε_max
    arenas_warmup_frac: float = 0.1  # ε ramps 0 -> ε_max over this fraction of the schedule
    arenas_end_frac: float = 1.0  # then cosine-decays to 0 at this fraction


@dataclass
class DataConfig:
    path: str = ""  # dataset folder with train.txt/valid.txt; "" = ../shared/data/tinystories or HF
    source: str = "auto"  # auto | local | hf  (hf = roneneldan/TinyStories through `datasets`)
    tokenizer: str = "bpe"  # bpe (train a byte-level BPE) | path to a tokenizer .json file | gpt2
    cache_dir: str = "data"  # where prepared token files and manifests are cached
    max_train_stories: int = 0  # 0 = all
    max_valid_stories: int = 0


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1  # cosine decays to lr × this
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | two_stage (BitNet: LR and WD drop halfway) | constant
    two_stage_lr_frac: float = 2.0 / 3.0  # second-stage peak LR = lr × this (1.5e-3 → 1e-3)
    weight_decay: float = 0.1  # two_stage sets it to 0 for the second half
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op CPU threads (0 = torch's default); 1 suits tiny models
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    # (a CPU without native bf16 GEMMs runs them in float32 from bf16 inputs: hgf.train.device)
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 0  # also checkpoint every N steps (0 = off); always at the end
    ckpt_minutes: float = 10.0  # also checkpoint after this many minutes since the last (0 = off)
    out_dir: str = "runs/default"
    progress: bool = True
    resume: str = "auto"  # auto: continue from the latest good checkpoint in out_dir | never
    keep_checkpoints: int = 3  # keep the last K checkpoints (and the end of every finished run)
    tensorboard: bool = False  # also log to out_dir/tb (needs the tensorboard package)
    # the length the LR/WD and gate schedules are laid over (0 = train.steps); steps past it hold
    # the schedules' final values. Set to the old length when a finished run is extended.
    schedule_steps: int = 0

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps or self.steps


@dataclass
class EvalConfig:
    every: int = 50  # validation every N steps on a fixed subset (0 = only at the end)
    batches: int = 8  # size of the fixed subset, in batches of train.batch_size
    full_at_end: bool = True


@dataclass
class InitConfig:
    """Start training from a pretrained model (hgf.train.init_from, docs/CONVERT.md)."""

    # a run folder, an hgf or Llama Hugging Face folder, or a BitNet checkpoint; "" = random init.
    # Its architecture becomes the model's (explicit model.* keys must agree); a resumed run never
    # re-reads it. The config key is init.from (the dataclass field from_).
    from_: str = ""
    subln: str = "identity"  # SubLN norms the source lacks: identity (weight = the mean RMS of
    #                          their input on calibration tokens) | ones (weight 1) | off (no SubLN)
    calib_batches: int = 4  # identity: batches of train.batch_size x train.seq_len to calibrate on


@dataclass
class DistillConfig:
    """Knowledge distillation (hgf.train.distill): loss = α·T²·KL(teacher ‖ student at T) +
    (1 − α)·CE, the teacher frozen in eval mode, its logits computed per micro-batch."""

    alpha: float = 0.0  # α; 0 = off (no teacher is loaded)
    temperature: float = 1.0  # T
    teacher: str = ""  # run / hgf or Llama HF folder; "" = init.from


@dataclass
class PTQTPConfig:
    """The trit-plane fit of ``hgf convert SRC --to ptqtp`` (hgf.model.ptqtp, docs/METHODS.md)."""

    iterations: int = 50  # most alternating rounds (α-step + T-step) per projection
    tol: float = 1e-4  # stop when a round lowers ‖W − Ŵ‖² by less than tol × its error before
    activations: str = "int8"  # int8 (per-token absmax, what the packed kernels run) | fp (paper)


@dataclass
class DistConfig:
    strategy: str = "none"  # none | ddp | fsdp2
    activation_checkpointing: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    hgf: HGFConfig = field(default_factory=HGFConfig)
    tequila: TequilaConfig = field(default_factory=TequilaConfig)
    sherry: SherryConfig = field(default_factory=SherryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ptqtp: PTQTPConfig = field(default_factory=PTQTPConfig)

    def to_dict(self) -> dict[str, Any]:
        return {sec: {_key_name(k): v for k, v in body.items()} for sec, body in asdict(self).items()}

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# Allowed values of the enumerated keys that no registry owns; see choices() for the others.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.mlp": ("swiglu", "relu2"),
    "model.subln": ("auto", "on", "off"),
    "hgf.fusion": ("additive", "convex"),
    "hgf.init": ("kaiming", "svd"),
    "data.source": ("auto", "local", "hf"),
    "train.schedule": ("cosine", "two_stage", "constant"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "train.resume": ("auto", "never"),
    "dist.strategy": ("none", "ddp", "fsdp2"),
    "init.subln": ("identity", "ones", "off"),
    "ptqtp.activations": ("int8", "fp"),
}


def _field_name(key: str) -> str:
    """The dataclass field of a config key name: a Python keyword gets a trailing underscore
    (``init.from`` is the field ``InitConfig.from_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _key_name(field_name: str) -> str:
    """The config key name of a dataclass field (the inverse of :func:`_field_name`)."""
    base = field_name[:-1]
    return base if field_name.endswith("_") and keyword.iskeyword(base) else field_name


# ---------------------------------------------------------------------------------------------
# Loading and merging


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the field type ``typ``; raise a one-line ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[...]: not used, kept strict
        raise ConfigError(f"{source}: {key}: unsupported field type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"{source}: {key} must be {typ.__name__}, got {type(value).__name__} {value!r}"
    )


def _flatten(d: dict[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    """``{"model": {"d_model": 8}}`` -> ``{"model.d_model": (8, source)}`` with checks."""
    sections = _section_types()
    out: dict[str, tuple[Any, str]] = {}
    for sec, body in d.items():
        if sec not in sections:
            raise ConfigError(f"{source}: unknown section [{sec}] (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{sec}] must be a table of keys")
        names = {_key_name(f.name) for f in fields(sections[sec])}
        for k, v in body.items():
            if k not in names:
                raise ConfigError(f"{source}: unknown key {sec}.{k}")
            out[f"{sec}.{k}"] = (v, source)
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr=1e-3", "--model.linear", "hgf"]`` -> nested dict (values still strings)."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            i += 1
            value = args[i]
        sec, _, name = key.partition(".")
        out.setdefault(sec, {})[name] = value
        i += 1
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: malformed TOML: {e}") from None


def read_json(path: str | Path, missing: str = "config file not found") -> Any:
    """A JSON file's contents; ConfigError ``"<path>: <missing>"`` when it does not exist and
    ``"<path>: malformed JSON: ..."`` when it does not parse."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: malformed JSON: {e}") from None


def build_config(*layers: tuple[dict[str, Any], str]) -> Config:
    """Build a validated Config from (nested dict, source name) layers, later layers win."""
    flat: dict[str, tuple[Any, str]] = {}
    for d, source in layers:
        flat.update(_flatten(d, source))
    size, size_src = flat.get("model.size", ("debug", "defaults"))
    if size not in SIZES:
        raise ConfigError(f"{size_src}: model.size={size!r} is not one of {', '.join(SIZES)}")
    merged = {f"model.{k}": (v, f"size {size!r}") for k, v in SIZES[size].items()}
    merged.update(flat)

    cfg = Config()
    hints = {sec: typing.get_type_hints(cls) for sec, cls in _section_types().items()}
    for key, (value, source) in merged.items():
        sec, name = key.split(".")
        name = _field_name(name)
        setattr(getattr(cfg, sec), name, _coerce(value, hints[sec][name], key, source))
    validate(cfg, {k: s for k, (_, s) in merged.items()})
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < size < TOML file < ``--section.key=value`` overrides."""
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        layers.append((read_toml(path), str(path)))
    if overrides:
        layers.append((parse_overrides(overrides), "command line"))
    return build_config(*layers)


def config_from_dict(d: dict[str, Any], source: str = "stored config") -> Config:
    return build_config((d, source))


def load_config_json(path: str | Path) -> Config:
    return config_from_dict(read_json(path), str(path))


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of every enumerated key: ``CHOICES``, and the keys whose values are the
    names of a registry (docs/STYLE.md §13): ``model.linear`` (hgf.model.linear.LINEARS),
    ``model.attention`` (hgf.model.attention.ATTENTIONS), ``hgf.targets``
    (hgf.model.linear.TARGETS) and ``hgf.gate`` (hgf.model.hgf_linear.GATE_FORWARD). Those
    modules build on this one, so the registries are read here when a config is validated, never
    when this module is imported."""
    from hgf.model.attention import ATTENTIONS
    from hgf.model.hgf_linear import GATE_FORWARD, GATE_MODES
    from hgf.model.linear import LINEARS, TARGETS

    return {"model.linear": tuple(LINEARS), "model.attention": tuple(ATTENTIONS), **CHOICES,
            "hgf.targets": tuple(TARGETS), "hgf.gate": tuple(GATE_FORWARD),
            "hgf.gate_mode": tuple(GATE_MODES)}


# The paper's arms (docs/METHOD.md §4), each a preset file configs/<arm>.toml that sets these
# (model.linear, model.attention); tests/test_presets.py checks the files against this table.
ARMS: dict[str, tuple[str, str]] = {
    "fp16": ("dense", "standard"), "bitnet": ("bitlinear", "standard"),
    "diff_only": ("dense", "differential"), "hgf": ("hgf", "differential"),
    "hgf_std": ("hgf", "standard"), "bitnet_diff": ("bitlinear", "differential"),
    "tequila": ("tequila", "standard"), "sherry": ("sherry", "standard"),  # docs/METHODS.md
}


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Raise ConfigError for impossible values; the message names the key and where it came from."""
    sources = sources or {}

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{sources.get(key, 'defaults')}: {key}={_get(cfg, key)!r}: {msg}")

    for key, allowed in choices().items():
        if _get(cfg, key) not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}")
    m, h, t = cfg.model, cfg.hgf, cfg.train
    for key in ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                "model.d_ff", "model.max_seq_len", "train.steps", "train.batch_size",
                "train.seq_len", "train.grad_accum", "quant.act_bits", "train.keep_checkpoints"):
        if _get(cfg, key) <= 0:
            fail(key, "must be > 0")
    if m.d_model % m.n_heads:
        fail("model.n_heads", f"must divide model.d_model={m.d_model}")
    if (m.d_model // m.n_heads) % 2:
        fail("model.n_heads", "head dim d_model/n_heads must be even (RoPE)")
    if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
        fail("model.n_kv_heads", f"must divide model.n_heads={m.n_heads} (0 = n_heads)")
    if m.attention == "differential" and m.n_kv_heads not in (0, m.n_heads):
        fail("model.n_kv_heads", "grouped-query attention needs model.attention=standard")
    if m.attention == "differential" and m.n_heads % 2:
        fail("model.n_heads", "must be even for differential attention (it uses n_heads/2 heads)")
    if t.seq_len > m.max_seq_len:
        fail("train.seq_len", f"exceeds model.max_seq_len={m.max_seq_len}")
    if m.linear == "hgf":
        if h.target_overhead < 0:
            fail("hgf.target_overhead", "must be >= 0")
        if h.target_overhead == 0 and h.rank <= 0:
            fail("hgf.rank", "must be > 0 (or set hgf.target_overhead)")
        if h.gate == "sigmoid" and not 0 < h.gate_init < 1:
            fail("hgf.gate_init", "must lie in (0, 1) for a sigmoid gate")
        if h.gate == "tanh" and not -1 < h.gate_init < 1:
            fail("hgf.gate_init", "must lie in (-1, 1) for a tanh gate")
    if m.linear == "sherry":
        for key in ("model.d_model", "model.d_ff"):
            if _get(cfg, key) % 4:
                fail(key, "must be a multiple of 4 for model.linear=sherry (3:4 groups)")
        sh = cfg.sherry
        if sh.arenas_max < 0:
            fail("sherry.arenas_max", "must be >= 0")
        for key in ("sherry.arenas_warmup_frac", "sherry.arenas_end_frac"):
            if not 0 <= _get(cfg, key) <= 1:
                fail(key, "must lie in [0, 1]")
        if sh.arenas_warmup_frac > sh.arenas_end_frac:
            fail("sherry.arenas_warmup_frac", "must be <= sherry.arenas_end_frac")
    if not math.isfinite(cfg.tequila.bias_scale):
        fail("tequila.bias_scale", "must be finite")
    if h.overhead_bits <= 0:
        fail("hgf.overhead_bits", "must be > 0")
    for key in ("hgf.gate_warmup_frac", "hgf.gate_freeze_frac", "train.min_lr_frac",
                "train.two_stage_lr_frac"):
        if not 0 <= _get(cfg, key) <= 1:
            fail(key, "must lie in [0, 1]")
    for key in ("train.lr", "hgf.gate_lr_mult", "hgf.lr_mult", "hgf.gate_l2", "train.weight_decay",
                "train.grad_clip", "train.warmup_steps", "eval.every", "eval.batches",
                "train.ckpt_every", "train.log_every", "train.threads", "train.ckpt_minutes",
                "train.schedule_steps"):
        if _get(cfg, key) < 0:
            fail(key, "must be >= 0")
    for key in ("train.beta1", "train.beta2"):
        if not 0 <= _get(cfg, key) < 1:
            fail(key, "must lie in [0, 1)")
    for key in ("train.lr", "train.ckpt_minutes"):
        if not math.isfinite(_get(cfg, key)):
            fail(key, "must be finite")
    d = cfg.distill
    if not 0 <= d.alpha <= 1:
        fail("distill.alpha", "must lie in [0, 1] (0 = no distillation)")
    if not (d.temperature > 0 and math.isfinite(d.temperature)):
        fail("distill.temperature", "must be > 0")
    if d.alpha > 0 and not (d.teacher or cfg.init.from_):
        fail("distill.alpha", "needs a teacher: set distill.teacher or init.from")
    if d.teacher and d.alpha == 0:
        fail("distill.teacher", "is set but distill.alpha=0 (no distillation); set distill.alpha")
    if cfg.init.calib_batches <= 0:
        fail("init.calib_batches", "must be > 0")
    if cfg.ptqtp.iterations < 0:
        fail("ptqtp.iterations", "must be >= 0 (0 = the init only)")
    if not (cfg.ptqtp.tol >= 0 and math.isfinite(cfg.ptqtp.tol)):
        fail("ptqtp.tol", "must be >= 0")


def _get(cfg: Config, key: str) -> Any:
    sec, name = key.split(".")
    return getattr(getattr(cfg, sec), _field_name(name))


def subln_enabled(m: ModelConfig) -> bool:
    return m.subln == "on" or (m.subln == "auto" and m.linear != "dense")


def kv_heads(m: ModelConfig) -> int:
    """Key/value heads of standard attention (``model.n_kv_heads``, 0 = ``model.n_heads``)."""
    return m.n_kv_heads or m.n_heads


# ---------------------------------------------------------------------------------------------
# Writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def dump_toml(d: dict[str, Any]) -> str:
    lines: list[str] = []
    for sec, body in d.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with some keys changed: ``replace(cfg, train={"steps": 5})``."""
    d = cfg.to_dict()
    for sec, body in sections.items():
        d.setdefault(sec, {}).update(body)
    return config_from_dict(d, "replace()")


__all__ = [
    "ARMS", "SIZES", "CHOICES", "Config", "ConfigError", "DataConfig", "DistConfig", "DistillConfig",
    "EvalConfig", "HGFConfig", "InitConfig", "ModelConfig", "QuantConfig", "TrainConfig",
    "build_config", "config_from_dict", "dump_toml", "kv_heads", "load_config",
    "load_config_json", "parse_overrides", "read_toml", "read_json", "replace", "subln_enabled",
    "validate",
]
