"""Tokenize a dataset once into flat token files, cached by the content of everything they depend on.

``prepare(cfg)`` writes ``<data.cache_dir>/<key>/`` with
    train.bin, valid.bin  every story's ids followed by the end-of-text id, concatenated; raw
                          little-endian uint16 when the vocabulary has <= 65535 ids, else uint32;
    tokenizer.json        the tokenizer that made them;
    manifest.json         format version, tokenizer hash, vocab size, eot id, dtype and per split
                          stories, tokens, text bytes and bytes/token.
``key`` hashes the sha256 of both text files, the tokenizer spec and its files, the vocabulary
size and the story caps, so the same inputs always land in the same folder and a second call only
reads the manifest. The folder is built under a temporary name and renamed into place, so it is
either complete or absent; a folder whose files disagree with its manifest is rebuilt.

Text bytes of a split = Σ over stories (UTF-8 bytes of the story + 1), the 1 standing for the
story's end-of-text separator (one byte, like the newline ending a line). Bits per byte is then
    bpb = (nats/token) · tokens / (text_bytes · ln 2) = (nats/token) / (bytes_per_token · ln 2),
comparable across tokenizers because every tokenizer sees the same stories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from hgf.config import Config
from hgf.data.sources import SPLITS, DataFiles, read_stories, resolve_files
from hgf.data.tokenizer import (
    BPE_MIN_FREQUENCY,
    TokenizerSpec,
    build_tokenizer,
    eot_id,
    id_range,
    resolve_spec,
)
from hgf.errors import HGFError
from hgf.runs import TOKENIZER_FILE, atomic_write_text

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
HASH_CACHE_FILE = "file_hashes.json"
ENCODE_BATCH = 1024  # stories per encode_batch call (one progress-bar step)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


@dataclass
class Prepared:
    """A prepared data folder: token files, tokenizer and manifest."""

    dir: Path
    manifest: dict
    vocab_size: int  # the tokenizer's id range: every id < vocab_size <= model.vocab_size
    eot_id: int
    tokenizer_path: Path
    built: bool = field(default=False, compare=False)  # True when this call tokenized the text

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of ``split`` (train | valid) as a read-only 1-D memmap."""
        n = self._split(split)["tokens"]
        return np.memmap(self.dir / f"{split}.bin", dtype=np.dtype(self.manifest["dtype"]).newbyteorder("<"),
                         mode="r", shape=(n,))

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))

    def bytes_per_token(self, split: str) -> float:
        s = self._split(split)
        return s["text_bytes"] / s["tokens"]

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise HGFError(f"unknown data split {split!r} (known: {', '.join(SPLITS)})")
        return self.manifest["splits"][split]


def load_prepared(path: str | Path) -> Prepared:
    """Open a prepared folder, checking every file against the manifest (one-line HGFError)."""
    d = Path(path)
    mf = d / MANIFEST_FILE
    if not mf.is_file():
        raise HGFError(f"{mf}: not found (not a prepared data folder; run `hgf data prepare`)")
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
        version = m["format_version"]
        if version != FORMAT_VERSION:
            raise HGFError(f"{mf}: format version {version}, this hgf reads {FORMAT_VERSION}")
        itemsize = np.dtype(m["dtype"]).itemsize
        sizes = {s: m["splits"][s]["tokens"] * itemsize for s in SPLITS}
        tok_hash = m["tokenizer_sha256"]
        p = Prepared(d, m, m["vocab_size"], m["eot_id"], d / TOKENIZER_FILE)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HGFError(f"{mf}: corrupt manifest ({type(e).__name__}: {e})") from None
    for split, want in sizes.items():
        f = d / f"{split}.bin"
        have = f.stat().st_size if f.is_file() else None
        if have != want:
            raise HGFError(f"{f}: {'missing' if have is None else f'{have} bytes'}, the manifest says "
                           f"{want} bytes (truncated or corrupt cache)")
    if not p.tokenizer_path.is_file() or _sha256(p.tokenizer_path) != tok_hash:
        raise HGFError(f"{p.tokenizer_path}: missing or does not match the manifest's tokenizer_sha256")
    return p


def prepare(cfg: Config, progress: bool = True) -> Prepared:
    """Tokenize ``cfg.data`` (or reuse the cached result) and return the prepared folder."""
    d = cfg.data
    for key in ("max_train_stories", "max_valid_stories"):
        if getattr(d, key) < 0:
            raise HGFError(f"data.{key}={getattr(d, key)}: must be >= 0 (0 = all stories)")
    files = resolve_files(cfg)
    for s in SPLITS:
        if not files.path(s).is_file():
            raise HGFError(f"{files.path(s)}: file not found (a dataset folder holds train.txt, valid.txt)")
    spec = resolve_spec(d.tokenizer)
    cache = Path(d.cache_dir)
    hashes = {s: file_sha256(files.path(s), cache / HASH_CACHE_FILE) for s in SPLITS}
    key_src = dict(format_version=FORMAT_VERSION, text_sha256=hashes, tokenizer=spec.kind,
                   tokenizer_files=[file_sha256(f, cache / HASH_CACHE_FILE) for f in spec.files],
                   bpe_min_frequency=BPE_MIN_FREQUENCY if spec.kind == "bpe" else None,
                   vocab_size=cfg.model.vocab_size, max_train_stories=d.max_train_stories,
                   max_valid_stories=d.max_valid_stories)
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    out = cache / key
    if out.exists():
        try:
            p = load_prepared(out)
        except HGFError as e:
            print(f"hgf: {e}; rebuilding {out}", file=sys.stderr)
            _discard(out)
        else:
            _check_windows(p.manifest["splits"], cfg)
            return p
    return _build(cfg, files, spec, hashes, out, progress)


def _build(cfg: Config, files: DataFiles, spec: TokenizerSpec, hashes: dict[str, str], out: Path,
           progress: bool) -> Prepared:
    """Read, tokenize and write the folder ``out`` under a temporary name, then rename it into place."""
    d, key, cache = cfg.data, out.name, out.parent
    stories = {s: read_stories(files.path(s), getattr(d, f"max_{s}_stories")) for s in SPLITS}
    tok = build_tokenizer(spec, d.tokenizer, stories["train"], cfg.model.vocab_size, progress)
    vocab = id_range(tok)
    eot, dtype = eot_id(tok), token_dtype(vocab)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        splits = {}
        for s in SPLITS:
            n = encode_to_file(tok, stories[s], eot, dtype, tmp / f"{s}.bin", progress, s)
            text_bytes = sum(len(x.encode("utf-8")) + 1 for x in stories[s])
            splits[s] = dict(file=str(files.path(s)), sha256=hashes[s], stories=len(stories[s]),
                             tokens=n, text_bytes=text_bytes, bytes_per_token=text_bytes / n)
        _check_windows(splits, cfg)
        tok.save(str(tmp / TOKENIZER_FILE))
        manifest = dict(format_version=FORMAT_VERSION, key=key, origin=files.origin,
                        tokenizer_spec=d.tokenizer, tokenizer_kind=spec.kind,
                        tokenizer_sha256=_sha256(tmp / TOKENIZER_FILE), vocab_size=vocab, eot_id=eot,
                        dtype=dtype.name, byte_order="little", max_train_stories=d.max_train_stories,
                        max_valid_stories=d.max_valid_stories,
                        text_bytes_rule="UTF-8 bytes of each story + 1 per story for its separator",
                        splits=splits)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same folder first: use theirs
            if not (out / MANIFEST_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return load_prepared(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    p = load_prepared(out)
    p.built = True
    return p


def encode_to_file(tok: Tokenizer, stories: list[str], eot: int, dtype: np.dtype, path: Path,
                   progress: bool = False, desc: str = "") -> int:
    """Write ids of every story followed by ``eot`` to ``path``; return the number of tokens."""
    n = 0
    with open(path, "wb") as f, tqdm(total=len(stories), desc=f"tokenize {desc}", unit="story",
                                     disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(stories), ENCODE_BATCH):
            batch = stories[i:i + ENCODE_BATCH]
            encs = tok.encode_batch_fast(batch, add_special_tokens=False)  # parallel (Rust threads)
            ids = np.fromiter(chain.from_iterable((*e.ids, eot) for e in encs), dtype=dtype)
            f.write(ids.tobytes())
            n += ids.size
            bar.update(len(batch))
    return n


def file_sha256(path: Path, cache_file: Path) -> str:
    """sha256 of a file's bytes, remembered in ``cache_file`` by (path, size, mtime)."""
    st = path.stat()
    entry = dict(size=st.st_size, mtime_ns=st.st_mtime_ns)
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    name = str(path.resolve())
    hit = known.get(name)
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in entry.items()):
        return hit["sha256"]
    known[name] = dict(entry, sha256=_sha256(path))
    atomic_write_text(cache_file, json.dumps(known, indent=1) + "\n")
    return known[name]["sha256"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_windows(splits: dict, cfg: Config) -> None:
    """Each split must hold at least one training window of ``train.seq_len + 1`` tokens."""
    window = cfg.train.seq_len + 1
    for s in SPLITS:
        info = splits[s]
        if info["tokens"] < window:
            raise HGFError(f"{info['file']}: too small: {info['stories']} stories give {info['tokens']} "
                           f"tokens, fewer than one training window (train.seq_len+1 = {window})")


def _discard(folder: Path) -> None:
    """Move a bad cache folder out of the way (atomic), then delete it."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process moved it first
        return
    shutil.rmtree(trash, ignore_errors=True)
