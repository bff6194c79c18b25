"""Every preset in configs/ loads, builds at the debug size, trains one step, and puts the intended
layer kind at every projection (full precision at embeddings and head)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from hgf.config import SIZES, load_config
from hgf.model import BitLinear, HGFLinear, build_model, lm_loss
from hgf.model.linear import ATTENTION_PROJ, MLP_PROJ, TARGETS
from hgf.model.sherry import SherryLinear
from hgf.model.tequila import TequilaLinear

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.toml") if p.parent.name != "reproduce")
GRIDS = sorted(p for p in (ROOT / "configs" / "reproduce").glob("*.toml")
               if "[grid]" in p.read_text(encoding="utf-8"))  # convert studies: own tests
ARMS_AXES = ARMS = {
    "fp16": ("dense", "standard"), "bitnet": ("bitlinear", "standard"),
    "diff_only": ("dense", "differential"), "hgf": ("hgf", "differential"),
    "hgf_std": ("hgf", "standard"), "bitnet_diff": ("bitlinear", "differential"),
    "tequila": ("tequila", "standard"), "sherry": ("sherry", "standard"),
}


def _debug(path: Path):
    over = [f"--model.{k}={v}" for k, v in SIZES["debug"].items()]
    return load_config(path, over + ["--model.size=debug", "--train.seq_len=32"])


def test_there_are_presets_for_every_arm():
    names = {p.stem for p in PRESETS}
    assert set(ARMS) <= names


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_arm_presets_set_the_axes(arm):
    cfg = load_config(ROOT / "configs" / f"{arm}.toml")
    assert (cfg.model.linear, cfg.model.attention) == ARMS[arm]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_preset_builds_runs_and_places_layers(path):
    cfg = _debug(path)
    model = build_model(cfg)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 17))
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)

    expected_types = {"dense": nn.Linear, "bitlinear": BitLinear, "hgf": HGFLinear,
                      "tequila": TequilaLinear, "sherry": SherryLinear}
    n_proj = 0
    for name, mod in model.named_modules():
        role = name.rsplit(".", 1)[-1]
        if role not in ATTENTION_PROJ + MLP_PROJ:
            continue
        n_proj += 1
        kind = cfg.model.linear
        if kind == "hgf" and role not in TARGETS[cfg.hgf.targets]:
            kind = "bitlinear"
        assert type(mod) is expected_types[kind], f"{name} is {type(mod).__name__}"
    assert n_proj == 7 * cfg.model.n_layers
    assert type(model.tok_emb) is nn.Embedding
    assert type(model.lm_head) is nn.Linear  # full precision, never ternary
    assert type(model.layers[0].attn).__name__.lower().startswith(cfg.model.attention)


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_reproduce_presets_load(path):
    from hgf.reproduce.grid import ARMS, load_preset, plan_grid

    preset = load_preset(str(path))
    assert set(preset.arms) <= set(ARMS) and preset.steps
    specs = plan_grid(preset, Path("out"))
    assert len(specs) == len(preset.arms) * len(preset.steps) * preset.seeds
    for spec in specs:
        assert (spec.cfg.model.linear, spec.cfg.model.attention) == ARMS_AXES[spec.arm]
        assert spec.cfg.train.steps == spec.steps
