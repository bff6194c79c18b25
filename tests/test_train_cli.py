"""End to end through the CLI: hgf train (+ resume), hgf eval, hgf plot, hgf bench train; the
contents of metrics.jsonl and run_info.json."""

import json
import math

import pytest

from hgf.cli import main
from hgf.runs import load_trained
from hgf.train.metrics import read_metrics
from trainkit import ROOT, VOCAB

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _args(run_dir, dataset, *extra):
    data, cache = dataset
    return [f"--model.vocab_size={VOCAB}", "--model.d_model=32", "--model.d_ff=64",
            "--train.steps=8", "--train.seq_len=16", "--train.batch_size=4", "--train.log_every=2",
            "--train.warmup_steps=2", "--eval.every=4", "--eval.batches=2", "--train.threads=1",
            "--train.progress=false", f"--train.out_dir={run_dir}", f"--data.path={data}",
            f"--data.cache_dir={cache}", *extra]


def test_train_eval_plot_through_the_cli(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    preset = str(ROOT / "configs" / "tinystories" / "hgf-debug.toml")
    assert main(["train", preset, *_args(run, dataset)]) == 0
    assert "done: 8 steps" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "run_info.json", "checkpoints/latest"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 1337 and info["versions"]["torch"] and info["hardware"]["cpu_count"]
    assert "commit" in info["git"] and info["command"]
    assert "/" not in info["command"][0]  # a bare program name, no machine path

    recs = read_metrics(run)
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "gates"} <= r.keys()
        assert len(r["gates"]) == 2 * 7 and all(0 < g < 1 for g in r["gates"].values())
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / _bpt(dataset))
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert len(r["zero_frac"]) == 14 and all(0 < z < 1 for z in r["zero_frac"].values())
        assert 0 <= r["flip_rate"] <= 1
    final = [r for r in recs if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["val_tokens"] > evals[0]["val_tokens"]

    assert main(["train", preset, *_args(run, dataset)]) == 0  # finished: resumes at the end
    assert "resumed from step 8" in capsys.readouterr().out
    assert read_metrics(run) == recs  # nothing logged twice, same numbers

    assert main(["eval", str(run)]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["val_loss"] == pytest.approx(final[0]["val_loss"], rel=1e-6)
    model, cfg = load_trained(run)
    assert cfg.model.linear == "hgf"

    # a run whose data section no longer yields its tokenizer (as after an import) is evaluated
    # with its own tokenizer file
    cfg_file = run / "config.json"
    d = json.loads(cfg_file.read_text())
    d["data"]["max_train_stories"] = 3  # another BPE would be trained from this
    cfg_file.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "using " + str(run / "tokenizer.json") in capsys.readouterr().out
    again = json.loads((run / "eval.json").read_text())
    assert again["val_loss"] == pytest.approx(out["val_loss"], rel=0.05)

    png = tmp_path / "p.png"
    assert main(["plot", str(run), str(run), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bpt(dataset):
    from hgf.config import load_config
    from hgf.data import prepare

    data, cache = dataset
    cfg = load_config(None, [f"--model.vocab_size={VOCAB}", f"--data.path={data}",
                             f"--data.cache_dir={cache}", "--train.seq_len=16"])
    return prepare(cfg, progress=False).bytes_per_token("valid")


def test_cli_errors_are_one_line(tmp_path, dataset, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs" / "fp16.toml"), "--train.lr=nan"]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics file not found" in err and err.count("\n") == 2


def test_bench_train_prints_a_table(capsys):
    assert main(["bench", "train", "--size=debug", "--arms=fp16,hgf", "--steps=2", "--warmup=1",
                 "--batch-size=2", "--seq-len=16", f"--config-dir={ROOT / 'configs'}"]) == 0
    out = capsys.readouterr().out
    assert "| fp16 |" in out and "| hgf |" in out and "| 1.00 |" in out


def test_bench_train_rows_per_dtype(capsys):
    assert main(["bench", "train", "--size=debug", "--arms=fp16", "--steps=1", "--warmup=0",
                 "--batch-size=2", "--seq-len=16", "--dtypes=float32,bfloat16,bfloat16-aten",
                 f"--config-dir={ROOT / 'configs'}"]) == 0
    out = capsys.readouterr().out
    assert all(f"| fp16@{d} |" in out for d in ("float32", "bfloat16", "bfloat16-aten"))
    assert "× fp16@float32" in out
    assert main(["bench", "train", "--size=debug", "--arms=fp16", "--dtypes=float16",
                 f"--config-dir={ROOT / 'configs'}"]) == 2
    assert "unknown dtype 'float16'" in capsys.readouterr().err
