"""Helpers shared by the inference tests: a tiny tokenizer, a tiny model trained for a few steps
on synthetic tokens (a plain AdamW loop, independent of the trainer), and a run directory."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hgf.config import load_config
from hgf.model import build_model, lm_loss
from hgf.runs import TOKENIZER_FILE, save_config, save_weights

# Tiny models are dominated by per-op overhead; with 2 OpenMP threads on a shared 2-core machine
# the threads spin-wait on each other and a step gets 10-20x slower. One thread is fastest here.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["Once upon a time there was a little dog. The dog liked to play in the sun.",
        "Tom and Lily went to the park. They saw a big red ball and played all day.",
        "Ça va? Üben macht den Meister. 日本語 🙂"]


def make_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on TEXT (id 0 is the end-of-text token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return tok


def corpus_ids(tok: Tokenizer) -> torch.Tensor:
    """The synthetic training stream: TEXT's stories separated by end-of-text, as token ids."""
    return torch.tensor(tok.encode("<|endoftext|>".join(TEXT) + "<|endoftext|>").ids)


@functools.cache
def train_tiny(arm: str, steps: int = 100, overrides: tuple[str, ...] = (), seed: int = 0):
    """A debug-size model of ``arm`` trained ``steps`` AdamW steps on random windows of the
    corpus (memorised, so greedy decoding has clear margins). Cached: do not modify the model."""
    torch.manual_seed(seed)
    cfg = load_config(ROOT / "configs" / f"{arm}.toml", ["--model.vocab_size=320", *overrides])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    stream = corpus_ids(make_tokenizer()).repeat(8)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=g)
        x = torch.stack([stream[s:s + 33] for s in starts.tolist()])  # [8, 33]
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), cfg, loss.item()


def make_run(run_dir: Path, model, cfg, tokenizer: Tokenizer | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    save_weights(model, run_dir / "model.safetensors")
    if tokenizer is not None:
        (run_dir / TOKENIZER_FILE).write_text(tokenizer.to_str(), encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    return run_dir
