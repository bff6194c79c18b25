"""The tokenizer inside a GGUF file: hgf's byte-level BPE <-> llama.cpp's ``gpt2`` tokenizer.

hgf tokenizers (``tokenizers`` JSON) are byte-level BPEs: GPT-2's regex pre-split
(``ByteLevel(add_prefix_space=False, use_regex=True)``), the 256 byte symbols, merges, and added
tokens such as ``<|endoftext|>``; no normalizer, no BOS. llama.cpp runs the same algorithm as
``tokenizer.ggml.model = "gpt2"`` with ``tokenizer.ggml.pre = "gpt-2"`` (the same regex), so the
GGUF carries:

    tokenizer.ggml.tokens       the id -> token strings (byte-level symbols, e.g. "Ġthe");
                                ids the tokenizer does not use, up to model.vocab_size, are
                                "[PAD<id>]" (type UNUSED), as convert_hf_to_gguf.py writes them
    tokenizer.ggml.token_type   NORMAL, CONTROL for special added tokens, USER_DEFINED for the
                                other added tokens
    tokenizer.ggml.merges       "left right" in merge-rank order
    eos / bos token id          ``<|endoftext|>`` when present; add_bos_token = add_eos_token = false

Anything else (a normalizer, another pre-tokenizer or model, a post-processor that adds tokens,
byte fallback, dropout, continuing-subword prefixes) has no faithful llama.cpp equivalent and is
refused with one line. :func:`tokenizer_json_from_fields` is the inverse, for ``hgf convert
x.gguf --to run``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hgf.data.sources import EOT
from hgf.errors import HGFError

# llama.cpp's llama_token_type (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GPT2_PRE = "gpt-2"


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_byte_level_bpe(t: dict[str, Any], source: str) -> None:
    model = t.get("model") or {}
    if model.get("type") != "BPE":
        raise HGFError(f"{source}: tokenizer model {model.get('type')!r} cannot go into a GGUF "
                       "(hgf exports byte-level BPE tokenizers only)")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise HGFError(f"{source}: BPE option {key}={model[key]!r} has no llama.cpp equivalent")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        raise HGFError(f"{source}: BPE byte_fallback/ignore_merges have no llama.cpp gpt2 equivalent")
    if t.get("normalizer") is not None:
        raise HGFError(f"{source}: a tokenizer normalizer ({t['normalizer'].get('type')}) has no "
                       "llama.cpp gpt2 equivalent")
    pre = t.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        raise HGFError(f"{source}: pre-tokenizer {json.dumps(pre)[:80]} is not GPT-2's byte-level "
                       "split (ByteLevel, use_regex, no prefix space), which is what llama.cpp "
                       "runs for tokenizer.ggml.pre=gpt-2")
    post = t.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        raise HGFError(f"{source}: post-processor {post.get('type')!r} adds tokens llama.cpp would "
                       "not add")


def vocab_from_tokenizer_json(text: str, vocab_size: int, source: str) -> GGUFVocab:
    """The GGUF vocabulary of a ``tokenizers`` JSON, padded to ``vocab_size`` ids."""
    try:
        t = json.loads(text)
    except json.JSONDecodeError:
        raise HGFError(f"{source}: tokenizer is not valid JSON") from None
    _check_byte_level_bpe(t, source)
    model = t["model"]
    by_id: dict[int, tuple[str, int]] = {i: (s, NORMAL) for s, i in model["vocab"].items()}
    for a in t.get("added_tokens") or []:
        by_id[a["id"]] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    top = max(by_id) + 1 if by_id else 0
    if top > vocab_size:
        raise HGFError(f"{source}: the tokenizer has ids up to {top - 1}, more than the model's "
                       f"model.vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        s, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(s)
        types.append(kind)
    if len(set(tokens)) != len(tokens):
        raise HGFError(f"{source}: the tokenizer maps two ids to the same token string")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = next((i for i, (s, _) in by_id.items() if s == EOT), None)
    return GGUFVocab(tokens, types, merges, eos)


def add_vocab(writer, vocab: GGUFVocab) -> None:
    """Write the ``tokenizer.ggml.*`` keys of ``vocab`` with a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
        writer.add_bos_token_id(vocab.eos_id)  # GPT-2's convention; never added (below)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# Back: the GGUF keys -> a tokenizers JSON


def tokenizer_json_from_fields(model: str, pre: str | None, tokens: list[str], types: list[int],
                               merges: list[str]) -> tuple[str | None, str]:
    """(tokenizers JSON, how) of a GGUF vocabulary; (None, why) where there is no faithful
    ``tokenizers`` equivalent (hgf then writes the run without a tokenizer and says why)."""
    if model in (None, "none", "no_vocab"):
        return None, "the file carries no tokenizer"
    if model != "gpt2":
        return None, f"tokenizer.ggml.model={model!r} is not a byte-level BPE (gpt2)"
    if pre not in (GPT2_PRE, "default", None):
        return None, (f"tokenizer.ggml.pre={pre!r}: only GPT-2's pre-tokenizer regex is "
                      "converted back")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, (s, k) in enumerate(zip(tokens, types, strict=True)) if k != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # added tokens are in the BPE vocabulary too (as tokenizers saves them): they keep their ids
    for i, (s, k) in enumerate(zip(tokens, types, strict=True)):
        if k in (CONTROL, USER_DEFINED):
            added = AddedToken(s, special=k == CONTROL, normalized=False)
            if k == CONTROL:
                tok.add_special_tokens([added])
            else:
                tok.add_tokens([added])
            if tok.token_to_id(s) != i:
                return None, f"added token {s!r} has id {i}, which tokenizers cannot reproduce"
    return tok.to_str(), f"byte-level BPE, {len(vocab)} tokens, {len(pairs)} merges"
