"""A model is only ever paired with the tokenizer it was trained with (hgf.data.tokenizer): the run's
weights record it, and eval, generate, export and convert refuse another one in one line that names
the tokenizer file, the weights and both id ranges. A tokenizer with fewer ids than model.vocab_size
is fine when it is the model's own (a BPE that ran out of merges, a padded vocabulary)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from hgf.cli import main
from hgf.data.tokenizer import id_range
from hgf.infer import read_header
from infer_utils import make_run, make_tokenizer, train_tiny
from trainkit import ROOT

pytest_plugins = ["train_fixtures"]  # the dataset fixture


def _train(root: Path, dataset: tuple[Path, Path], vocab: int) -> Path:
    data, cache = dataset
    run = root / f"v{vocab}"
    assert main(["train", str(ROOT / "configs" / "tinystories" / "bitnet-debug.toml"),
                 f"--model.vocab_size={vocab}", "--model.d_model=32", "--model.d_ff=64",
                 "--model.n_layers=1", "--train.steps=2", "--train.seq_len=16",
                 "--train.batch_size=4", "--eval.every=0", "--eval.batches=1",
                 "--eval.full_at_end=false", "--train.threads=1", "--train.progress=false",
                 f"--train.out_dir={run}", f"--data.path={data}", f"--data.cache_dir={cache}"]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> dict[int, Path]:
    """Runs on the same stories with model.vocab_size 320 and 290 (BPEs of as many ids) and 384
    (the stories give only 353 BPE ids: the model's vocabulary is larger than its tokenizer's)."""
    root = tmp_path_factory.mktemp("pairing")
    return {v: _train(root, dataset, v) for v in (320, 290, 384)}


def _record(weights: Path) -> dict[str, str]:
    with safe_open(str(weights), "pt") as f:
        return f.metadata() or {}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hgf: error: "), err
    return lines[0]


def test_training_records_its_tokenizer_in_the_weights(runs) -> None:
    from tokenizers import Tokenizer

    for vocab, ids in ((320, 320), (290, 290), (384, 353)):
        tok = runs[vocab] / "tokenizer.json"
        meta = _record(runs[vocab] / "model.safetensors")
        assert meta["tokenizer_sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
        assert meta["tokenizer_ids"] == str(ids) == str(id_range(Tokenizer.from_file(str(tok))))


@pytest.fixture
def swapped(runs, tmp_path) -> Path:
    """The 320-id run with the tokenizer.json of the 290-id run copied over its own."""
    run = tmp_path / "swapped"
    shutil.copytree(runs[320], run)
    shutil.copyfile(runs[290] / "tokenizer.json", run / "tokenizer.json")
    return run


def _refusal(run: Path, tok: Path) -> str:
    return (f"hgf: error: {tok}: not the tokenizer {run / 'model.safetensors'} was trained with "
            "(this one has 290 ids, sha256 ")


@pytest.mark.parametrize("command", [
    ["eval", "{run}"],
    ["generate", "{run}", "--prompt", "Tom", "--max-new-tokens", "2"],
    ["export", "{run}", "-o", "{out}/m.hgf"],
    ["convert", "{run}", "--to", "hf", "{out}/hf"],
    ["convert", "{run}", "--to", "run", "{out}/run"],
], ids=["eval", "generate", "export", "convert-hf", "convert-run"])
def test_commands_refuse_the_tokenizer_of_another_run(command, swapped, tmp_path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in swapped.iterdir() if p.is_file()}
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(run=swapped, out=out) for a in command]
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(_refusal(swapped, swapped / "tokenizer.json"))
    assert "the model's has 320 ids" in line
    assert list(out.iterdir()) == []
    assert {p.name: p.read_bytes() for p in swapped.iterdir() if p.is_file()} == before  # no eval.json


def test_export_refuses_another_runs_tokenizer_file(runs, tmp_path, capsys) -> None:
    other = runs[290] / "tokenizer.json"
    assert main(["export", str(runs[320]), "-o", str(tmp_path / "m.hgf"), "--tokenizer",
                 str(other)]) == 2
    assert _one_line(capsys.readouterr().err).startswith(_refusal(runs[320], other))
    assert not (tmp_path / "m.hgf").exists()


def test_eval_refuses_a_data_config_that_makes_another_tokenizer(runs, tmp_path, capsys) -> None:
    # without its tokenizer.json a run is evaluated with the tokenizer its data config makes:
    # that must be the one its weights record, not a BPE trained on other stories
    run = tmp_path / "run"
    shutil.copytree(runs[320], run)
    (run / "tokenizer.json").unlink()
    assert main(["eval", str(run), "--data.max_train_stories=60"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "tokenizer.json: not the tokenizer " + str(run / "model.safetensors") in line
    assert "the model's has 320 ids" in line and not (run / "eval.json").exists()
    assert main(["eval", str(run)]) == 0  # the run's own data config makes its own tokenizer


def test_a_model_with_more_ids_than_its_tokenizer_is_used_normally(runs, tmp_path, capsys) -> None:
    run = runs[384]
    assert main(["eval", str(run)]) == 0
    loss = json.loads((run / "eval.json").read_text())["val_loss"]
    assert main(["generate", str(run), "--prompt", "Tom", "--max-new-tokens", "2"]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "m.hgf")]) == 0
    assert read_header(tmp_path / "m.hgf").tokenizer_json == (run / "tokenizer.json").read_text()
    # converted there and back, the run keeps its record and evaluates the same
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), "--to", "run", str(tmp_path / "back")]) == 0
    assert _record(tmp_path / "back" / "model.safetensors")["tokenizer_ids"] == "353"
    assert main(["eval", str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "eval.json").read_text())["val_loss"]
    assert back == pytest.approx(loss, rel=1e-6)


def test_convert_records_the_tokenizer_of_a_run_without_a_record(tmp_path, capsys) -> None:
    model, cfg, _ = train_tiny("bitnet")
    old = make_run(tmp_path / "old", model, cfg, make_tokenizer())  # weights without a record
    assert "tokenizer_sha256" not in _record(old / "model.safetensors")
    assert main(["convert", str(old), "--to", "run", str(tmp_path / "new")]) == 0
    meta = _record(tmp_path / "new" / "model.safetensors")
    assert meta["tokenizer_sha256"] == hashlib.sha256((old / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["tokenizer_ids"] == "300"
