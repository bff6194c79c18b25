"""A run folder is never silently replaced, a crash or kill loses at most a few minutes, a finished
run can be extended, a batch too big for the machine is announced, and `hgf train --help` says how
overrides and defaults work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from hgf.cli import main
from hgf.config import TrainConfig
from hgf.errors import HGFError
from hgf.train import train
from hgf.train.checkpoint import Checkpointer
from hgf.train.metrics import read_metrics
from hgf.train.schedule import Schedule
from trainkit import ROOT, tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("--eval.every=0", "--eval.full_at_end=false", "--train.threads=1")


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _lrs(run_dir):
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _cli_args(run_dir, dataset, *extra):
    data, cache = dataset
    return [str(ROOT / "configs" / "fp16.toml"), "--model.vocab_size=320", "--model.d_model=32",
            "--model.d_ff=64", "--model.max_seq_len=32", "--train.seq_len=16",
            "--train.batch_size=4", "--train.steps=4", "--train.warmup_steps=2",
            "--train.log_every=1", "--train.progress=false", *FAST,
            f"--train.out_dir={run_dir}", f"--data.path={data}", f"--data.cache_dir={cache}",
            *extra]


# -- a finished run is never replaced without --overwrite ------------------------------------


def test_finished_run_without_checkpoints_is_refused_unless_overwrite(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(["train", *_cli_args(run, dataset)]) == 0
    Checkpointer(run).dir.rename(tmp_path / "deleted-checkpoints")  # "to save space"
    before = {f: (run / f).read_bytes() for f in ("model.safetensors", "metrics.jsonl")}
    capsys.readouterr()

    assert main(["train", *_cli_args(run, dataset, "--train.seed=7")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err and "--overwrite" in err
    assert {f: (run / f).read_bytes() for f in before} == before  # untouched
    assert not Checkpointer(run).dir.exists()

    assert main(["train", *_cli_args(run, dataset, "--train.seed=7"), "--overwrite"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert (run / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(_losses(run)) == [1, 2, 3, 4]  # one run's log, not two


def test_overwrite_replaces_a_run_with_checkpoints(tmp_path, dataset):
    train(tiny_config(tmp_path, dataset, "fp16", *FAST, "--train.steps=6",
                      "--train.ckpt_every=2"))
    res = train(tiny_config(tmp_path, dataset, "fp16", *FAST, "--train.steps=4",
                            "--train.lr=0.01"), overwrite=True)
    assert res.resumed_from is None and sorted(res.losses) == [1, 2, 3, 4]
    assert [p.name for p in Checkpointer(tmp_path).checkpoints()] == ["step_0000004"]
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]


def test_start_from_zero_over_an_old_log_says_so_and_keeps_it(tmp_path, dataset, capsys):
    cfg = tiny_config(tmp_path, dataset, "fp16", *FAST, "--train.steps=3")
    train(cfg)
    old = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "model.safetensors").unlink()  # as if killed before its first checkpoint
    Checkpointer(tmp_path).dir.rename(tmp_path.parent / f"{tmp_path.name}-gone")
    capsys.readouterr()
    res = train(cfg)
    err = capsys.readouterr().err
    assert res.resumed_from is None
    lines = [ln for ln in err.splitlines() if "step 0" in ln]
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "metrics.jsonl.1" in lines[0]
    assert (tmp_path / "metrics.jsonl.1").read_text() == old
    assert sorted(_losses(tmp_path)) == [1, 2, 3]


# -- checkpoints on a time interval and on SIGTERM -------------------------------------------


def test_default_config_checkpoints_on_a_time_interval(tmp_path, dataset):
    assert TrainConfig().ckpt_every == 0 and TrainConfig().ckpt_minutes > 0
    train(tiny_config(tmp_path, dataset, "fp16", *FAST, "--train.steps=3",
                      "--train.ckpt_minutes=1e-9", "--train.keep_checkpoints=10"))
    assert [p.name for p in Checkpointer(tmp_path).checkpoints()] == [
        "step_0000001", "step_0000002", "step_0000003"]


def _child_env():
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _steps_logged(path):
    """Complete train records in a log another process is writing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    return sum('"kind": "train"' in ln for ln in text.splitlines(keepends=True)
               if ln.endswith("\n"))


def test_sigterm_checkpoints_at_the_next_step_and_the_run_resumes_exactly(tmp_path, dataset):
    run, ref = tmp_path / "run", tmp_path / "ref"
    long = ("--train.steps=20000", "--train.ckpt_minutes=600")  # far longer than the test
    toml = tmp_path / "run.toml"
    toml.write_text(tiny_config(run, dataset, "hgf", *FAST, *long).to_toml(), encoding="utf-8")
    child = subprocess.Popen([sys.executable, "-m", "hgf", "train", str(toml)], env=_child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while _steps_logged(run / "metrics.jsonl") < 3:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hgf: stopped by SIGTERM after step ") and "resume" in last, err
    step = int(last.split("after step ")[1].split(":")[0])
    assert step >= 3 and (run / "checkpoints" / f"step_{step:07d}").is_dir()
    assert not (run / "model.safetensors").exists() and "done:" not in out

    # resumed for 3 more steps; the LR schedule still spans the 20000 steps of the killed run
    end = step + 3
    res = train(tiny_config(run, dataset, "hgf", *FAST, f"--train.steps={end}"))
    assert res.resumed_from == step and sorted(res.losses) == list(range(step + 1, end + 1))
    train(tiny_config(ref, dataset, "hgf", *FAST, f"--train.steps={end}",
                      "--train.schedule_steps=20000"))
    assert _losses(run) == _losses(ref) and len(_losses(ref)) == end  # exact floats
    assert _same_weights(run, ref)


def test_ctrl_c_checkpoints_at_the_step_boundary_and_exits_130(tmp_path, dataset, capsys,
                                                               monkeypatch):
    from hgf.train.loop import Trainer

    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    step_fn = Trainer.train_step

    def ctrl_c_in_step_2(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step_fn(self, step)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_2)
    assert main(["train", *_cli_args(run, dataset, "--train.steps=6")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hgf: stopped by SIGINT after step 2: ")
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert [p.name for p in Checkpointer(run).checkpoints()] == ["step_0000002"]
    monkeypatch.setattr(Trainer, "train_step", step_fn)
    assert main(["train", *_cli_args(run, dataset, "--train.steps=6")]) == 0
    assert "done: 6 steps" in capsys.readouterr().out and sorted(_losses(run)) == list(range(1, 7))


# -- extending a finished run ----------------------------------------------------------------


def test_a_finished_run_is_extended_with_the_lr_holding_its_final_value(tmp_path, dataset, capsys):
    over = (*FAST, "--hgf.gate_warmup_frac=0.5", "--train.keep_checkpoints=1",
            "--train.ckpt_every=2")
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, dataset, "hgf", *over, "--train.steps=12", "--train.schedule_steps=8"))
    train(tiny_config(b, dataset, "hgf", *over, "--train.steps=8"))
    capsys.readouterr()
    res = train(tiny_config(b, dataset, "hgf", *over, "--train.steps=12"))
    err = capsys.readouterr().err
    assert res.resumed_from == 8 and sorted(res.losses) == [9, 10, 11, 12]
    assert _losses(a) == _losses(b) and _same_weights(a, b)

    cfg = tiny_config(b, dataset, "hgf", *over, "--train.steps=12")
    final_lr = cfg.train.lr * cfg.train.min_lr_frac
    assert all(_lrs(b)[s] == pytest.approx(final_lr) for s in (9, 10, 11, 12))
    note = [ln for ln in err.splitlines() if "8-step run" in ln]
    assert len(note) == 1 and "holds its final value" in note[0] and f"{final_lr:.3g}" in note[0]
    stored = json.loads((b / "config.json").read_text())["train"]
    assert stored["steps"] == 12 and stored["schedule_steps"] == 8
    # the finished 8-step run's checkpoint outlives keep_checkpoints=1
    assert [p.name for p in Checkpointer(b).checkpoints()] == ["step_0000008", "step_0000012"]

    with pytest.raises(HGFError, match=r"train.steps=6 is below the checkpoint's step 12"):
        train(tiny_config(b, dataset, "hgf", *over, "--train.steps=6"))
    with pytest.raises(HGFError, match=r"train.schedule_steps=16 differs .* 8"):
        train(tiny_config(b, dataset, "hgf", *over, "--train.steps=16",
                          "--train.schedule_steps=16"))


def test_a_run_folder_is_continued_through_the_cli(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    assert main(["train", *_cli_args(run, dataset)]) == 0
    capsys.readouterr()
    assert main(["train", str(run), "--train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "resumed from step 4" in out
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["train"]["schedule_steps"] == 4


def test_schedules_hold_their_final_values_past_schedule_steps():
    for kind, final in (("cosine", 1e-3 * 0.1), ("two_stage", 1e-3 * 0.5), ("constant", 1e-3)):
        t = TrainConfig(steps=20, schedule_steps=10, warmup_steps=2, lr=1e-3, min_lr_frac=0.1,
                        schedule=kind, two_stage_lr_frac=0.5)
        s = Schedule(t)
        assert [s.lr_at(i) for i in (10, 15, 19)] == pytest.approx([final] * 3)
        assert s.lr_at(5) == Schedule(TrainConfig(**{**vars(t), "steps": 10,
                                                     "schedule_steps": 0})).lr_at(5)
        if kind == "two_stage":
            assert s.wd_at(15) == 0


# -- memory warning and help -----------------------------------------------------------------


def test_a_batch_too_big_for_the_memory_is_announced(tmp_path, dataset, capsys, monkeypatch):
    from hgf.train import guard

    cfg = tiny_config(tmp_path, dataset, "fp16", *FAST, "--train.steps=1")
    need = guard.training_memory(cfg, torch.device("cpu"))
    assert need and need > 0
    monkeypatch.setattr(guard, "available_memory", lambda device: (need // 2, "MemAvailable"))
    train(cfg)
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "GiB" in ln]
    assert len(warn) == 1 and warn[0].startswith("hgf: warning:") and "train.batch_size" in warn[0]
    monkeypatch.setattr(guard, "available_memory", lambda device: (need * 2, "MemAvailable"))
    train(cfg, overwrite=True)
    assert "GiB" not in capsys.readouterr().err
    assert guard.meminfo_available("MemTotal: 100 kB\nMemAvailable:  2048 kB\n") == 2048 * 1024


def test_train_help_shows_overrides_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--section.key=value", "train.out_dir", "hgf info", "--overwrite",
                 "(default: False)", "train.ckpt_minutes", "train.steps", "SIGTERM"):
        assert text in out, text
    assert f"default {TrainConfig().out_dir}" in out


def test_a_run_folder_trained_by_another_process_is_refused(tmp_path, dataset, capsys):
    """Two processes training one folder would interleave their checkpoints: the second is
    refused in one line while the first holds the folder's lock, and a killed holder (kill -9)
    leaves no stale lock."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hgf.runs import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", *_cli_args(run, dataset)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another process is training this run" in err
        assert sorted(p.name for p in run.iterdir()) == [".hgf.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *_cli_args(run, dataset)]) == 0  # the kernel dropped the dead lock


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, dataset, capsys):
    run = tmp_path / "typo"
    assert main(["train", *_cli_args(run, dataset, "--model.vocab_size=10")]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert not run.exists()  # not even the lock file
