"""Distributed training on CPU (gloo, 2 processes) against one process (docs/STYLE.md §10).

N processes × batch b must train exactly like 1 process × batch N·b (the sampler deals the same
rows out, gradients are averaged), up to float summation order. Tolerances (measured differences
in brackets): training loss, gradient norm, validation loss, gates rtol 1e-5 [≤ 2e-6]; zero
fractions / flip rates abs 1e-3 (a flip of one weight in ~10^4); final weights abs 1e-4
[1.2e-5] (AdamW divides by sqrt(v̂), so ~1e-7 gradient differences move weights by more).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hgf.config import Config
from hgf.data import prepare, write_stories
from hgf.errors import HGFError
from hgf.runs import load_trained
from hgf.train import train
from hgf.train.batches import eval_batches
from hgf.train.checkpoint import LATEST
from hgf.train.metrics import read_metrics
from trainkit import ROOT, make_stories, tiny_config

RTOL, FRAC_ATOL, WEIGHT_ATOL = 1e-5, 1e-3, 1e-4
TIMEOUT = 300  # seconds; a hung collective fails the test instead of hanging the suite
# 4 updates of 2 micro-batches with clipping, a gate L2 pull and gate warmup; checkpoints at 2, 4
RUN = ("--train.steps=4", "--train.ckpt_every=2", "--train.keep_checkpoints=5",
       "--train.grad_accum=2", "--train.grad_clip=0.5", "--hgf.gate_l2=0.1",
       "--hgf.gate_warmup_frac=0.5", "--eval.every=2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny story set, prepared (BPE + token cache) once so the spawned ranks only read it."""
    root = tmp_path_factory.mktemp("dist_data")
    write_stories(root / "ds" / "train.txt", make_stories(400, seed=1))
    write_stories(root / "ds" / "valid.txt", make_stories(40, seed=2))
    dataset = (root / "ds", root / "cache")
    prepare(tiny_config(root / "unused", dataset), progress=False)
    return dataset


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(out: Path, data: tuple[Path, Path], batch: int, *over: str) -> Config:
    return tiny_config(out, data, "hgf", *RUN, f"--train.batch_size={batch}", *over)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _worker(rank: int, world_size: int, port: int, cfgs: list[Config]) -> None:
    """One rank: join the group (as torchrun would set it up) and train each config in turn."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for cfg in cfgs:
            train(cfg)
    finally:
        dist.destroy_process_group()


def spawn(cfgs: list[Config], world_size: int = 2) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned interpreters
    ctx = mp.start_processes(_worker, (world_size, free_port(), cfgs), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {TIMEOUT} s")


def metrics(run: Path, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r["kind"] == kind}


def assert_same_run(ref: Path, run: Path) -> None:
    """Same losses, gradient norms, gates, validation and weights (tolerances: module doc)."""
    a, b = metrics(ref, "train"), metrics(run, "train")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=RTOL), (step, key)
        assert b[step]["gates"] == pytest.approx(a[step]["gates"], rel=RTOL)
    for kind in ("eval", "final"):
        a, b = metrics(ref, kind), metrics(run, kind)
        assert sorted(a) == sorted(b) and a
        for step in a:
            assert b[step]["val_loss"] == pytest.approx(a[step]["val_loss"], rel=RTOL)
            assert b[step]["val_tokens"] == a[step]["val_tokens"]
            if kind == "eval":
                assert b[step]["zero_frac"] == pytest.approx(a[step]["zero_frac"], abs=FRAC_ATOL)
                assert b[step]["flip_rate"] == pytest.approx(a[step]["flip_rate"], abs=FRAC_ATOL)
    wa, wb = (load_file(str(p / "model.safetensors")) for p in (ref, run))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


def checkpoint_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())


def cut_back(run: Path, to: Path | None = None) -> Path:
    """``run`` (or a copy) as if killed right after its step-2 checkpoint."""
    if to is not None:
        shutil.copytree(run, to)
        run = to
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / LATEST).unlink()
    return run


def test_eval_batches_are_dealt_out_to_the_ranks_once_each():
    tokens = torch.arange(500).numpy()
    whole = [x for x, _ in eval_batches(tokens, 3, 16, max_windows=25)]  # 9 batches (last: 1)
    ranks = [[x for x, _ in eval_batches(tokens, 3, 16, 25, r, 2)] for r in range(2)]
    assert [len(r) for r in ranks] == [5, 4]
    interleaved = [ranks[i % 2][i // 2] for i in range(9)]  # batch i went to rank i mod 2
    assert all(torch.equal(a, b) for a, b in zip(whole, interleaved, strict=True))


def test_strategy_none_with_several_processes_is_an_error(tmp_path, data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HGFError, match=r"2 processes .*dist\.strategy=none; set "
                                       r"--dist\.strategy=ddp or --dist\.strategy=fsdp2"):
        train(config(tmp_path, data, 4))


def test_fsdp2_and_checkpointing_in_one_plain_process_equal_none(tmp_path, data):
    train(config(tmp_path / "ref", data, 4))
    train(config(tmp_path / "one", data, 4, "--dist.strategy=fsdp2",
                 "--dist.activation_checkpointing=true"))
    assert_same_run(tmp_path / "ref", tmp_path / "one")
    state = checkpoint_state(tmp_path / "one", 2)
    assert state["layout"] == "dcp" and "world_size" not in state
    assert "layout" not in checkpoint_state(tmp_path / "ref", 2)  # single-process format kept


@pytest.mark.dist
def test_ddp_torchrun_equals_one_process_and_resumes_in_one(tmp_path, data):
    ref, run = tmp_path / "ref", tmp_path / "ddp"
    train(config(ref, data, 4))
    toml = tmp_path / "run.toml"
    toml.write_text(config(run, data, 2).to_toml(), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "hgf", "train", str(toml),
           "--dist.strategy=ddp"]
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("done: 4 steps") == 1  # rank 0 reports
    assert_same_run(ref, run)
    assert checkpoint_state(run, 2)["world_size"] == 2

    cut_back(run)  # the 2-process checkpoint resumed by 1 process with the same global batch
    with pytest.raises(HGFError, match=r"global batch .* 2×1 differs from the checkpoint's 2×2"):
        train(config(run, data, 2))
    assert train(config(run, data, 4)).resumed_from == 2
    assert_same_run(ref, run)


@pytest.mark.dist
def test_fsdp2_equals_one_process_and_resumes_across_world_sizes(tmp_path, data):
    tied = "--model.tie_embeddings=true"
    ref, run = tmp_path / "ref", tmp_path / "fsdp2"
    train(config(ref, data, 4, tied))
    cut = cut_back(ref, tmp_path / "cut")  # a 1-process checkpoint, resumed by 2 processes
    spawn([config(run, data, 2, tied, "--dist.strategy=fsdp2"),
           config(cut, data, 2, tied, "--dist.strategy=fsdp2",
                  "--dist.activation_checkpointing=true")])
    assert_same_run(ref, run)  # also: BitLinear scales from the whole, not the sharded, weight
    assert_same_run(ref, cut)
    state = checkpoint_state(run, 2)
    assert state["layout"] == "dcp" and state["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= state["files"].keys()
    model, cfg = load_trained(run)  # the consolidated export loads in one process
    assert model.lm_head.weight is model.tok_emb.weight and cfg.dist.strategy == "fsdp2"

    cut_back(run)  # the sharded step-2 checkpoint resumed by 1 process
    assert train(config(run, data, 4, tied)).resumed_from == 2
    assert_same_run(ref, run)


@pytest.mark.dist
def test_fsdp2_with_channel_gates_equals_one_process(tmp_path, data):
    """Vector gates (hgf.gate_mode = channel) stay whole under FSDP2, like the scalar ones."""
    ref, run = tmp_path / "ref", tmp_path / "fsdp2"
    train(config(ref, data, 4, "--hgf.gate_mode=channel"))
    spawn([config(run, data, 2, "--hgf.gate_mode=channel", "--dist.strategy=fsdp2")])
    assert_same_run(ref, run)
    a, b = (metrics(r, "train")[4]["gate_range"] for r in (ref, run))
    assert a.keys() == b.keys()
    for name in a:  # each projection's channel gates: min and max
        assert b[name] == pytest.approx(a[name], rel=RTOL), name
