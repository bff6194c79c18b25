"""hgf.reproduce.oracle: a frozen BitNet backbone plus a trained g = 1 correction."""

import json

import pytest
import torch

from hgf.model.hgf_linear import HGFLinear
from hgf.reproduce.oracle import build_probe, main, oracle_config
from hgf.runs import load_run_config, load_trained
from hgf.train import train
from trainkit import tiny_config

pytest_plugins = ["train_fixtures"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("oracle")
    for arm in ("bitnet", "fp16"):
        train(tiny_config(root / arm, dataset, arm, "--train.steps=8"))
    return root


def test_probe_starts_as_the_bitnet_model_and_trains_only_the_correction(runs):
    cfg = oracle_config(load_run_config(runs / "bitnet"), 4, "attention", 5, 1e-2)
    probe = build_probe(runs / "bitnet", cfg)
    bitnet, _ = load_trained(runs / "bitnet")
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(probe.eval()(x), bitnet(x))  # B = 0: exactly the BitNet model
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    gates = [float(m.gate_value()) for m in probe.modules() if isinstance(m, HGFLinear)]
    assert gates and all(g == 1.0 for g in gates)
    assert not any(isinstance(m, HGFLinear) for n, m in probe.named_modules() if "mlp" in n)


def test_cli_writes_the_table_and_refuses_a_non_bitnet_run(runs, tmp_path, capsys):
    out = tmp_path / "oracle.json"
    assert main([str(runs / "bitnet"), str(runs / "fp16"), "--ranks", "2", "--targets",
                 "attention", "--steps", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["rank"] == 2 and row["steps"] == 3 and row["overhead_2bit"] > 0
    want = (res["bitnet_val_loss"] - row["val_loss"]) / (res["bitnet_val_loss"] - res["fp16_val_loss"])
    assert row["recovery"] == pytest.approx(want)
    assert "| attention | 2 |" in out.with_suffix(".md").read_text()
    assert main([str(runs / "fp16"), str(runs / "fp16"), "--out", str(tmp_path / "x.json")]) == 2
    assert "needs a bitnet run" in capsys.readouterr().err


def test_rows_are_saved_one_by_one_and_a_rerun_resumes_and_shares(runs, tmp_path, monkeypatch):
    import hgf.reproduce.oracle as oracle

    out = tmp_path / "oracle.json"
    args = [str(runs / "bitnet"), str(runs / "fp16"), "--ranks", "2,3", "--targets", "attention",
            "--steps", "2", "--out", str(out)]
    trained = []
    real = oracle.probe_row

    class Killed(BaseException):  # the process dies (kill -9) during the second row
        pass

    def killed_after_one(*a):
        if trained:
            raise Killed
        trained.append(a[4])
        return real(*a)

    monkeypatch.setattr(oracle, "probe_row", killed_after_one)
    with pytest.raises(Killed):
        main(args)
    assert not out.exists()
    saved = json.loads((oracle.rows_dir(out) / "attention-r2" / "row.json").read_text())
    assert saved["rank"] == 2 and not (oracle.rows_dir(out) / "attention-r3").exists()

    # another process holds rank 3: this one keeps rank 2, skips rank 3, writes no table
    from hgf.runs import run_lock
    monkeypatch.setattr(oracle, "probe_row", real)
    with run_lock(oracle.rows_dir(out) / "attention-r3"):
        assert main(args) == 0
    assert not out.exists()

    def counted(*a):
        trained.append(a[4])
        return real(*a)

    monkeypatch.setattr(oracle, "probe_row", counted)
    assert main(args) == 0  # only rank 3 trains now; the table is written, the rows removed
    assert trained == [2, 3]
    res = json.loads(out.read_text())
    assert [r["rank"] for r in res["rows"]] == [2, 3]
    assert res["rows"][0]["val_loss"] == saved["val_loss"]
    assert not oracle.rows_dir(out).exists()
    assert main(args) == 0 and trained == [2, 3]  # a finished probe trains nothing again

    assert main(args[:-4] + ["--steps", "5", "--out", str(out)]) == 2  # other settings: refused
