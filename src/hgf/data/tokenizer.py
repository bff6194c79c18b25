"""Tokenizers from the ``tokenizers`` library; bpe and gpt2 are byte level (every text round-trips).

``data.tokenizer`` is one of
    bpe          train a byte-level BPE on the train stories: GPT-2 regex pre-split, 256 byte
                 symbols, merges up to ``model.vocab_size`` ids, ``<|endoftext|>`` = id 0;
    gpt2         the GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256) from the folder
                 ``../shared/data/tokenizers/gpt2`` (``encoder.json`` + ``vocab.bpe``);
    a folder     holding GPT-2 style ``encoder.json`` + ``vocab.bpe``;
    a .json file a serialized ``tokenizers.Tokenizer``.
``<|endoftext|>`` is added as a special token when the vocabulary lacks it. The vocabulary must fit
the model: ``vocab_size(tokenizer) <= model.vocab_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
