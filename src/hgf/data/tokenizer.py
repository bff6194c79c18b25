"""Tokenizers from the ``tokenizers`` library; bpe and gpt2 are byte level (every text round-trips).

``data.tokenizer`` is one of
    bpe          train a byte-level BPE on the train stories: GPT-2 regex pre-split, 256 byte
                 symbols, merges up to ``model.vocab_size`` ids, ``<|endoftext|>`` = id 0;
    gpt2         the GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256) from the folder
                 ``../shared/data/tokenizers/gpt2`` (``encoder.json`` + ``vocab.bpe``);
    a folder     holding GPT-2 style ``encoder.json`` + ``vocab.bpe``;
    a .json file a serialized ``tokenizers.Tokenizer``.
``<|endoftext|>`` is added as a special token when the vocabulary lacks it. The vocabulary must fit
the model: ``vocab_size(tokenizer) <= model.vocab_size``; and a model is paired only with the
tokenizer it was trained with (see "Pairing a tokenizer with a model" below).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hgf.data.sources import EOT, shared_path
from hgf.errors import HGFError

DEFAULT_GPT2 = "../shared/data/tokenizers/gpt2"
GPT2_FILES = ("encoder.json", "vocab.bpe")
BPE_MIN_FREQUENCY = 2


@dataclass(frozen=True)
class TokenizerSpec:
    """A resolved ``data.tokenizer``: its kind (bpe | json | gpt2) and the files it reads."""

    kind: str
    files: tuple[Path, ...] = ()


def resolve_spec(spec: str) -> TokenizerSpec:
    """Check ``data.tokenizer`` and find its files (a one-line HGFError when they are missing)."""
    if spec == "bpe":
        return TokenizerSpec("bpe")
    if spec == "gpt2":
        folder = shared_path(DEFAULT_GPT2)
        if folder is None:
            raise HGFError(f"data.tokenizer=gpt2: folder {DEFAULT_GPT2} not found; put the GPT-2 "
                           f"{' + '.join(GPT2_FILES)} there or set data.tokenizer to their folder")
    else:
        folder = Path(spec)
    if folder.is_dir():
        files = tuple(folder / f for f in GPT2_FILES)
        for f in files:
            if not f.is_file():
                raise HGFError(f"data.tokenizer={spec!r}: {f} not found (a tokenizer folder holds "
                               f"GPT-2 {' + '.join(GPT2_FILES)})")
        return TokenizerSpec("gpt2", files)
    if folder.is_file():
        return TokenizerSpec("json", (folder,))
    raise HGFError(f"data.tokenizer={spec!r}: not bpe, gpt2, a tokenizer .json file or a folder "
                   "with encoder.json + vocab.bpe (path not found)")


def train_bpe(stories: list[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE with at most ``vocab_size`` ids trained on ``stories``; EOT = id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(stories, trainer, length=len(stories))
    return tok


def load_tokenizer(spec: TokenizerSpec, origin: str) -> Tokenizer:
    """A file-backed tokenizer (kind json or gpt2); ``origin`` is the config value for messages."""
    try:
        if spec.kind == "gpt2":
            tok = Tokenizer(models.BPE.from_file(*(str(f) for f in spec.files)))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            tok = Tokenizer.from_file(str(spec.files[0]))
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HGFError(f"data.tokenizer={origin!r}: cannot load {spec.files[0]}: {first}") from None
    tok.add_special_tokens([EOT])
    return tok


def build_tokenizer(spec: TokenizerSpec, origin: str, train_stories: list[str], vocab_size: int,
                    progress: bool = False) -> Tokenizer:
    """The tokenizer of ``spec`` (trained on ``train_stories`` for bpe), checked against the model."""
    tok = (train_bpe(train_stories, vocab_size, progress) if spec.kind == "bpe"
           else load_tokenizer(spec, origin))
    need = id_range(tok)
    if need > vocab_size:
        raise HGFError(f"model.vocab_size={vocab_size} is smaller than the vocabulary of tokenizer "
                       f"{origin!r} ({need} ids); set --model.vocab_size={need} (or larger)")
    return tok


def id_range(tok: Tokenizer) -> int:
    """1 + the largest id the tokenizer can emit (its vocabulary size when ids are dense)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    assert i is not None, "build_tokenizer always adds the end-of-text token"
    return i


# ---------------------------------------------------------------------------------------------
# Pairing a tokenizer with a model
#
# A tokenizer with fewer ids than model.vocab_size is normal (the BPE ran out of merges on a small
# corpus, or the vocabulary was padded, as GPT-2's 50,257 ids to 50,304), so sizes alone cannot
# tell a model's own tokenizer from another run's. The weights of a run therefore record the
# tokenizer they were trained with: the metadata of model.safetensors holds the sha256 of its
# tokenizer.json bytes and its id range (written by training and by `hgf convert --to run`).
# The rule, for every command that pairs a tokenizer file with a model:
#   1. an id >= model.vocab_size                       -> refused (the embedding has no such row);
#   2. recorded by the weights and the sha256 differs  -> refused (another tokenizer), naming the
#                                                         file, the weights and both id ranges;
#   3. weights without a record (older runs)           -> 1 only.
# hgf eval also tokenizes its data with exactly that tokenizer (hgf.commands.eval); hgf convert
# copies along a tokenizer.json that is no tokenizers file unchecked, as it always did.

TOKENIZER_SHA256 = "tokenizer_sha256"  # keys of the record in the weights' safetensors metadata
TOKENIZER_IDS = "tokenizer_ids"


@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer a model was trained with, as recorded in its weights file ``source``."""

    sha256: str
    ids: int
    source: Path


def tokenizer_metadata(path: str | Path | None) -> dict[str, str]:
    """The record of the tokenizer file ``path`` for a weights file's metadata ({} without one,
    or when the file is not a tokenizers JSON file)."""
    if path is None or not Path(path).is_file():
        return {}
    data = Path(path).read_bytes()
    try:
        tok = parse_tokenizer(data, str(path))
    except HGFError:
        return {}
    return {TOKENIZER_SHA256: hashlib.sha256(data).hexdigest(), TOKENIZER_IDS: str(id_range(tok))}


def read_record(weights: str | Path) -> TokenizerRecord | None:
    """The tokenizer recorded in a weights file, or None (no record, or no readable file)."""
    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        return TokenizerRecord(meta[TOKENIZER_SHA256], int(meta[TOKENIZER_IDS]), Path(weights))
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def check_tokenizer(data: bytes, label: str, vocab_size: int,
                    record: TokenizerRecord | None = None) -> Tokenizer:
    """The tokenizer of file contents ``data`` (named ``label`` in messages), checked to fit a model
    of ``model.vocab_size`` ids trained with the tokenizer ``record`` (rules above)."""
    tok = parse_tokenizer(data, label)
    n = id_range(tok)
    if n > vocab_size:
        raise HGFError(f"{label}: the tokenizer has {n} tokens, more than the model's "
                       f"model.vocab_size={vocab_size}")
    sha = hashlib.sha256(data).hexdigest()
    if record is not None and sha != record.sha256:
        raise HGFError(f"{label}: not the tokenizer {record.source} was trained with (this one "
                       f"has {n} ids, sha256 {sha[:12]}; the model's has {record.ids} ids, sha256 "
                       f"{record.sha256[:12]})")
    return tok


def check_tokenizer_file(path: str | Path, vocab_size: int, weights: str | Path,
                         carried: bool = False) -> Tokenizer | None:
    """:func:`check_tokenizer` of the file ``path`` for the model whose weights are ``weights``.
    ``carried``: the file is only copied along (hgf convert), so one that is not a tokenizers JSON
    file is let through unchecked (None) instead of refused."""
    path = Path(path)
    if not path.is_file():
        raise HGFError(f"{path}: tokenizer file not found")
    data = path.read_bytes()
    if carried:
        try:
            parse_tokenizer(data, str(path))
        except HGFError:
            return None
    return check_tokenizer(data, str(path), vocab_size, read_record(weights))


def parse_tokenizer(data: str | bytes, label: str) -> Tokenizer:
    """A tokenizer from the text of a ``tokenizers`` JSON file (one-line HGFError otherwise)."""
    try:
        return Tokenizer.from_str(data if isinstance(data, str) else data.decode("utf-8"))
    except Exception as e:  # tokenizers raises bare Exception subclasses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HGFError(f"{label}: not a tokenizers JSON file: {first}") from None
