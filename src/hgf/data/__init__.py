"""Data pipeline: text files of stories -> tokenizer -> cached flat token files.

    from hgf.data import prepare
    p = prepare(cfg)              # <data.cache_dir>/<key>/{train,valid}.bin, tokenizer.json, manifest.json
    ids = p.tokens("train")       # 1-D memmap of token ids, stories separated by p.eot_id
"""

from hgf.data.prepare import Prepared, load_prepared, prepare, token_dtype
from hgf.data.sources import EOT, DataFiles, read_stories, resolve_files, write_stories
from hgf.data.tokenizer import build_tokenizer, resolve_spec, train_bpe

__all__ = [
    "EOT", "DataFiles", "Prepared", "build_tokenizer", "load_prepared", "prepare", "read_stories",
    "resolve_files", "resolve_spec", "token_dtype", "train_bpe", "write_stories",
]
