"""Text generation, one implementation for the training model and the packed model.

Prefill the prompt once (positions 0..L-1) into the static KV cache, then decode one token at a
time at position L, L+1, ...; only the new token goes through the model. Next-token choice from
the last logits z (float32):
    greedy            argmax z                              (temperature 0; top_k = 1 is the same)
    sampling          p = softmax(z / T), restricted to the top_k largest, then to the smallest
                      set of most likely tokens whose mass reaches top_p (nucleus), renormalised,
                      drawn with a CPU torch.Generator seeded by ``seed`` (same draws on any device)
Generation stops at the end-of-text token, after ``max_new_tokens``, or when the sequence would
pass ``model.max_seq_len``. Text is streamed as it is produced: the generated ids are decoded
again after every token and only the new, complete characters are written (a multi-byte
character split over tokens waits until its last byte arrives).

What to generate with (a run directory or a packed file) is loaded by hgf.infer.load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from hgf.errors import HGFError
from hgf.infer.engine import decode_runner
from hgf.model.transformer import Transformer

EOT = "<|endoftext|>"


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> int:
    """Pick the next token id from logits ``[vocab]``."""
    z = logits.detach().float().cpu()
    if temperature <= 0:
        return int(z.argmax())
    z = z / temperature
    if 0 < top_k < z.numel():
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs.sort(descending=True)
        drop = p_sorted.cumsum(0) - p_sorted >= top_p  # mass before this token already enough
        probs = probs.scatter(0, order[drop], 0.0)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One HGFError line for an impossible generation setting."""
    if max_new_tokens < 1:
        raise HGFError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise HGFError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise HGFError(f"--top-k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise HGFError(f"--top-p must lie in (0, 1], got {top_p}")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated ids, without the end-of-text token
    stop_reason: str = ""  # eot | max_new_tokens | max_seq_len
    text: str = ""


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eot_id: int | None = None,
                 on_token: Callable[[int], None] | None = None,
                 native: bool | None = None) -> Generation:
    """Prefill + KV-cached decode; ``on_token`` sees every generated id as it comes. ``native``:
    the native decoder (hgf.infer.engine) for a packed model where it can run (None), always
    (True) or never (False: the PyTorch Transformer)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    max_len = model.cfg.model.max_seq_len
    n = len(prompt_ids)
    if n == 0:
        raise HGFError("the prompt is empty (and the tokenizer has no end-of-text token to start "
                       "from)")
    if n >= max_len:
        raise HGFError(f"the prompt has {n} tokens; model.max_seq_len={max_len} leaves no room "
                       "to generate")
    vocab = model.cfg.model.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise HGFError(f"the prompt has token id {bad[0]} outside the model's vocabulary of "
                       f"{vocab} (tokenizer and model do not match)")
    budget = min(max_new_tokens, max_len - n)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    out = Generation(list(prompt_ids))
    # hgf.infer.engine: the native decoder for a packed CPU model, else the Transformer
    with decode_runner(model, n + budget, native) as forward:
        logits = forward(prompt_ids, 0)  # prefill
        for i in range(budget):
            tok = sample_next(logits, temperature, top_k, top_p, gen)
            if tok == eot_id:
                out.stop_reason = "eot"
                break
            out.ids.append(tok)
            if on_token is not None:
                on_token(tok)
            if i + 1 < budget:
                logits = forward([tok], n + i)
        else:
            out.stop_reason = "max_new_tokens" if budget == max_new_tokens else "max_seq_len"
    return out


class TextStream:
    """Incremental detokenizer: ``push(id)`` writes the newly completed text."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.done = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next byte
            self._emit(text)

    def finish(self) -> str:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=False))
        return self.done

    def _emit(self, text: str) -> None:
        if len(text) > len(self.done):
            self.write(text[len(self.done):])
        self.done = text


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stream: Callable[[str], None] | None = None) -> Generation:
    """Generate a continuation of ``prompt``; ``stream`` receives text pieces as they come."""
    eot_id = tokenizer.token_to_id(EOT)
    prompt_ids = tokenizer.encode(prompt).ids or ([eot_id] if eot_id is not None else [])
    streamer = TextStream(tokenizer, stream or (lambda s: None))
    out = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                       eot_id, streamer.push)
    out.text = streamer.finish()
    return out
