"""Checkpoints: exact resume, NaN stop keeping the last good checkpoint, corrupt/truncated files."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hgf.errors import HGFError
from hgf.train import train
from hgf.train.checkpoint import Checkpointer
from hgf.train.metrics import read_metrics
from trainkit import tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, dataset, monkeypatch):
    over = ("--train.ckpt_every=4", "--train.grad_accum=2", "--hgf.gate_warmup_frac=0.3",
            "--hgf.gate_l2=0.1")
    full = train(tiny_config(tmp_path / "a", dataset, "hgf", *over))

    save = Checkpointer.save

    def save_then_interrupt(self, step, *args):
        path = save(self, step, *args)
        if step == 8:
            raise KeyboardInterrupt  # killed right after the step-8 checkpoint
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", dataset, "hgf", *over))
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = train(tiny_config(tmp_path / "b", dataset, "hgf", *over))

    assert resumed.resumed_from == 8 and sorted(resumed.losses) == [9, 10, 11, 12]
    assert _train_losses(tmp_path / "b") == _train_losses(tmp_path / "a")  # exact floats
    assert len(_train_losses(tmp_path / "a")) == 12
    evals = [[r for r in read_metrics(tmp_path / d) if r["kind"] != "train"] for d in "ab"]
    assert evals[0] == evals[1]  # same validation, flip rates, gates, final metrics
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.final.loss == resumed.final.loss
    info = json.loads((tmp_path / "b" / "run_info.json").read_text())
    assert info["restarts"][0]["step"] == 8


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset, "fp16", "--train.lr=1e30", "--train.warmup_steps=0",
                      "--train.schedule=constant", "--train.grad_clip=0", "--train.ckpt_every=1",
                      "--eval.every=0")
    with pytest.raises(HGFError, match=r"non-finite (loss|gradient norm) .* at step (\d+); run "
                                       r"stopped, last good checkpoint: .*step_") as e:
        train(cfg)
    ckpts = Checkpointer(tmp_path).checkpoints()
    assert ckpts and f"step {len(ckpts) + 1};" in str(e.value)
    assert f"{ckpts[-1].name}" in str(e.value)
    assert not (tmp_path / "model.safetensors").exists()
    losses = list(_train_losses(tmp_path).values())
    assert losses and all(math.isfinite(v) for v in losses)


def _finished_run(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset, "bitnet", "--train.ckpt_every=4", "--train.steps=8")
    train(cfg)
    return cfg


def test_truncated_checkpoint_falls_back_to_previous_good_one(tmp_path, dataset, capsys):
    cfg = _finished_run(tmp_path, dataset)
    ck = Checkpointer(tmp_path)
    newest = ck.checkpoints()[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    assert ck.find_resumable().name == "step_0000004"
    assert "truncated or corrupt checkpoint file" in capsys.readouterr().err
    res = train(cfg)  # resumes from step 4 and finishes again
    assert res.resumed_from == 4 and sorted(res.losses) == [5, 6, 7, 8]


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path, dataset):
    cfg = _finished_run(tmp_path, dataset)
    for ck in Checkpointer(tmp_path).checkpoints():
        f = ck / "train.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, flipped bits
        f.write_bytes(bytes(data))
    with pytest.raises(HGFError) as e:
        train(cfg)
    msg = str(e.value)
    assert "no usable checkpoint" in msg and "sha256 mismatch" in msg and "\n" not in msg


def test_resume_refuses_a_different_config_and_resume_never(tmp_path, dataset):
    _finished_run(tmp_path, dataset)
    with pytest.raises(HGFError, match="train.lr=0.5 differs"):
        train(tiny_config(tmp_path, dataset, "bitnet", "--train.ckpt_every=4", "--train.steps=8",
                          "--train.lr=0.5"))
    with pytest.raises(HGFError, match="train.resume=never"):
        train(tiny_config(tmp_path, dataset, "bitnet", "--train.steps=8", "--train.resume=never"))


def test_keeps_last_k_and_leaves_no_temporary_folders(tmp_path, dataset):
    train(tiny_config(tmp_path, dataset, "fp16", "--train.ckpt_every=2", "--train.keep_checkpoints=2",
                      "--eval.every=0"))
    ck = Checkpointer(tmp_path)
    assert [p.name for p in ck.checkpoints()] == ["step_0000010", "step_0000012"]
    assert (ck.dir / "latest").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in ck.dir.iterdir()) == ["latest", "step_0000010", "step_0000012"]
    state = json.loads((ck.dir / "step_0000012" / "state.json").read_text())
    assert state["step"] == 12 and state["format"] == "hgf-checkpoint"
