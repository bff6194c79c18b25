"""Where the text comes from, and how a text file is split into stories.

A dataset folder holds ``train.txt`` and ``valid.txt`` in the TinyStories layout: every story is
followed by a separator line, ``story\\n<|endoftext|>\\nstory\\n<|endoftext|>\\n...``. A file is
split on ``<|endoftext|>``; each piece is stripped of surrounding whitespace and empty pieces are
dropped, so a missing final separator or ``\\r\\n`` around separators is harmless.

The folder is ``data.path`` when set. Otherwise ``../shared/data/tinystories`` relative to the
current directory or to the repository root; failing that (``data.source`` = auto or hf) the
Hugging Face dataset ``roneneldan/TinyStories`` is downloaded through ``datasets`` and written into
``<data.cache_dir>/hf/`` in the same layout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hgf
from hgf.config import Config
from hgf.errors import HGFError
from hgf.runs import atomic_write

EOT = "<|endoftext|>"
SPLITS = ("train", "valid")
DEFAULT_DATA = "../shared/data/tinystories"
HF_DATASET = "roneneldan/TinyStories"
HF_SPLITS = {"train": "train", "valid": "validation"}
# A file without any separator is read as one story; beyond this size it cannot be one story.
MAX_STORY_BYTES = 16384
HOW_TO_GET = (f"put train.txt and valid.txt (stories separated by {EOT} lines) in {DEFAULT_DATA} or "
              f"set data.path, or use data.source=hf to download {HF_DATASET} (pip install hgf[hf])")


@dataclass(frozen=True)
class DataFiles:
    """The two text files of a dataset and where they came from (``local`` or ``hf``)."""

    train: Path
    valid: Path
    origin: str

    def path(self, split: str) -> Path:
        return self.train if split == "train" else self.valid


def shared_path(rel: str) -> Path | None:
    """``rel`` resolved against the current directory, then against the repository root."""
    for base in (Path.cwd(), Path(hgf.__file__).resolve().parents[2]):
        p = (base / rel).resolve()
        if p.exists():
            return p
    return None


def read_stories(path: Path, max_stories: int = 0) -> list[str]:
    """The stories of one text file (the first ``max_stories`` when > 0), checked."""
    if not path.is_file():
        raise HGFError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise HGFError(f"{path}: file is empty (expected stories separated by {EOT} lines)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HGFError(f"{path}: not valid UTF-8 at byte offset {e.start} (is the file mis-encoded? "
                       "re-save it as UTF-8)") from None
    if EOT not in text and len(raw) > MAX_STORY_BYTES:
        raise HGFError(f"{path}: no {EOT} separator in {len(raw):,} bytes; put a line {EOT} "
                       "after every story")
    stories = [s for s in (piece.strip() for piece in text.split(EOT)) if s]
    if not stories:
        raise HGFError(f"{path}: file holds no story, only {EOT} separators")
    return stories[:max_stories] if max_stories > 0 else stories


def resolve_files(cfg: Config) -> DataFiles:
    """The train/valid files ``cfg.data`` points at (downloading them if it says so)."""
    d = cfg.data
    if d.source != "hf":
        folder = Path(d.path) if d.path else shared_path(DEFAULT_DATA)
        if folder is not None and folder.is_dir():
            return DataFiles(folder / "train.txt", folder / "valid.txt", "local")
        if d.path:
            raise HGFError(f"data.path={d.path!r}: dataset folder not found (it must hold "
                           "train.txt and valid.txt)")
        if d.source == "local":
            raise HGFError(f"no dataset found: {HOW_TO_GET}")
    return download_tinystories(Path(d.cache_dir) / "hf", d.max_train_stories, d.max_valid_stories,
                                required=d.source == "hf")


def download_tinystories(root: Path, max_train: int, max_valid: int, required: bool) -> DataFiles:
    """Download ``roneneldan/TinyStories`` once into ``root/<caps>/{train,valid}.txt``."""
    folder = root / f"TinyStories-train{max_train or 'all'}-valid{max_valid or 'all'}"
    files = DataFiles(folder / "train.txt", folder / "valid.txt", "hf")
    if files.train.is_file() and files.valid.is_file():
        return files
    try:
        import datasets
    except ImportError:
        if required:
            raise HGFError("data.source=hf needs the `datasets` package: pip install hgf[hf]") from None
        raise HGFError(f"no dataset found: {HOW_TO_GET}") from None
    for split, cap in (("valid", max_valid), ("train", max_train)):
        hf_split = HF_SPLITS[split] + (f"[:{cap}]" if cap > 0 else "")
        print(f"hgf: downloading {HF_DATASET} split {hf_split} ...", file=sys.stderr)
        try:
            rows = datasets.load_dataset(HF_DATASET, split=hf_split)
            stories = [s for s in (row["text"].strip() for row in rows) if s]
        except Exception as e:  # network, hub and format errors all end the same way
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HGFError(f"could not download {HF_DATASET} ({msg}); "
                           f"{HOW_TO_GET}") from None
        write_stories(files.path(split), stories[:cap] if cap > 0 else stories)
    return files


def write_stories(path: Path, stories: list[str]) -> None:
    """Write ``stories`` in the TinyStories layout, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{s}\n{EOT}\n" for s in stories)
    atomic_write(path, write)
