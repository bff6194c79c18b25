"""Export: what the packed file holds (round trip), the byte breakdown vs hgf.memory, and the
one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hgf.cli import main
from hgf.errors import HGFError
from hgf.infer import byte_breakdown, export_model, export_run, load_packed, read_header
from hgf.kernels import unpack_ternary
from hgf.model import HGFLinear, ternarize
from hgf.model.quant import BitLinear
from infer_utils import make_run, make_tokenizer, train_tiny


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())  # noqa: SIM118 (safe_open is not a dict)
        return {k: f.get_tensor(k) for k in names}, f.metadata()


@pytest.fixture(scope="module")
def hgf_file(tmp_path_factory) -> Path:
    model, cfg, _ = train_tiny("hgf")
    run = make_run(tmp_path_factory.mktemp("run") / "hgf", model, cfg, make_tokenizer())
    out = run.parent / "m.hgf"
    export_run(run, out)
    return out


def test_round_trip_tensors(hgf_file: Path) -> None:
    model, cfg, _ = train_tiny("hgf")
    tensors, meta = _read(hgf_file)
    assert meta["format"] == "hgf-packed" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == cfg.to_dict()
    assert meta["tokenizer"] == make_tokenizer().to_str()
    for name, mod in model.named_modules():
        if not isinstance(mod, BitLinear):
            continue
        w_t, s_w = ternarize(mod.weight)
        packed = tensors[f"{name}.weight_packed"]
        assert torch.equal(unpack_ternary(packed, "i2", mod.out_features, mod.in_features),
                           w_t.to(torch.int8))
        assert tensors[f"{name}.weight_scale"].item() == pytest.approx(s_w.item(), rel=1e-7)
        if isinstance(mod, HGFLinear):
            g = mod.gate_value()
            assert 0.05 < g < 0.5  # trained, not at init exactly, still small
            assert torch.equal(tensors[f"{name}.B"], (g * mod.B).half())
            assert torch.equal(tensors[f"{name}.A"], mod.A.half())
    assert torch.equal(tensors["tok_emb.weight"], model.tok_emb.weight.half())
    assert tensors["layers.0.attn.lambda_q1"].dtype == torch.float32
    packed_model, header = load_packed(hgf_file)
    assert header.tokenizer_json == meta["tokenizer"]
    sd = packed_model.state_dict()
    assert torch.equal(sd["layers.1.mlp.down_proj.weight_packed"],
                       tensors["layers.1.mlp.down_proj.weight_packed"])


def test_convex_fusion_folds_into_scale(tmp_path: Path) -> None:
    model, cfg, _ = train_tiny("hgf", 3, ("--hgf.fusion=convex", "--hgf.gate_init=0.25"))
    export_model(model, cfg, tmp_path / "c.hgf")
    tensors, _ = _read(tmp_path / "c.hgf")
    mod = model.layers[0].attn.q_proj
    g, (_, s_w) = mod.gate_value(), ternarize(mod.weight)
    assert tensors["layers.0.attn.q_proj.weight_scale"].item() == pytest.approx(
        (s_w / (1 - g)).item(), rel=1e-6)


def test_int8_embeddings_and_tied_head(tmp_path: Path) -> None:
    model, cfg, _ = train_tiny("bitnet", 3, ("--model.tie_embeddings=true",))
    export_model(model, cfg, tmp_path / "e.hgf", packing="tq1", embeddings="int8")
    tensors, _ = _read(tmp_path / "e.hgf")
    assert "lm_head.weight" not in tensors and tensors["tok_emb.weight"].dtype == torch.int8
    w = model.tok_emb.weight
    deq = tensors["tok_emb.weight"].float() * tensors["tok_emb.row_scale"][:, None]
    assert ((deq - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    packed, _ = load_packed(tmp_path / "e.hgf")
    assert packed.lm_head.weight is packed.tok_emb.weight
    assert torch.allclose(packed.tok_emb.weight, deq)


def test_cli_export_prints_breakdown_matching_memory_report(tmp_path: Path, capsys) -> None:
    model, cfg, _ = train_tiny("hgf")
    run = make_run(tmp_path / "run", model, cfg, make_tokenizer())
    assert main(["export", str(run), "-o", str(tmp_path / "m.hgf"), "--packing", "tq1"]) == 0
    text = capsys.readouterr().out
    assert "correction overhead" in text and "file size on disk" in text
    header = read_header(tmp_path / "m.hgf")
    b = byte_breakdown(header)
    n_gates = sum(isinstance(m, HGFLinear) for m in model.modules())
    assert b["ternary"] == b["ternary_predicted"]  # packed bytes = hgf.memory.packed_bytes
    assert b["correction"] == b["correction_predicted"] - 2 * n_gates  # gates folded into B'
    assert b["overhead_measured"] == pytest.approx(b["overhead_predicted"], rel=1e-3)
    assert b["file_size"] == (tmp_path / "m.hgf").stat().st_size
    assert b["tensor_total"] + b["header_bytes"] == b["file_size"]


# ---------------------------------------------------------------------------------------------
# Bad files: one HGFError line that names the problem


def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    t, m = _read(src)
    t.update(tensors or {})
    m.update(meta or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(dst), metadata=m)
    return dst


def test_bad_files(hgf_file: Path, tmp_path: Path) -> None:
    q = "layers.0.attn.q_proj"
    data = hgf_file.read_bytes()
    (tmp_path / "trunc.hgf").write_bytes(data[:-100])
    (tmp_path / "junk.hgf").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    cases = {
        tmp_path / "absent.hgf": "packed model file not found",
        tmp_path / "trunc.hgf": "truncated: the header declares",
        tmp_path / "junk.hgf": "corrupt safetensors header",
        _rewrite(hgf_file, tmp_path / "v.hgf", meta={"format_version": "99"}):
            "format version 99 is not supported",
        _rewrite(hgf_file, tmp_path / "f.hgf", meta={"format": "other"}):
            "not an hgf packed model",
        _rewrite(hgf_file, tmp_path / "p.hgf", meta={"packing": "tq1"}):
            f"{q}.weight_packed has shape [64, 16], expected [64, 13] for packing tq1",
        _rewrite(hgf_file, tmp_path / "s.hgf", tensors={f"{q}.weight_packed": torch.zeros(
            64, 15, dtype=torch.uint8)}): "expected [64, 16] for packing i2",
        _rewrite(hgf_file, tmp_path / "d.hgf", tensors={f"{q}.weight_scale": torch.tensor(
            1.0, dtype=torch.float16)}): f"{q}.weight_scale has dtype F16, expected F32",
        _rewrite(hgf_file, tmp_path / "m.hgf", tensors={f"{q}.A": None}):
            f"missing tensor {q}.A",
        _rewrite(hgf_file, tmp_path / "u.hgf", tensors={"extra": torch.zeros(2)}):
            "unexpected tensor extra",
        _rewrite(hgf_file, tmp_path / "c.hgf", meta={"config": "{"}):
            "metadata 'config' is not valid JSON",
    }
    for path, msg in cases.items():
        with pytest.raises(HGFError, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
            load_packed(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_export_refuses_a_tokenizer_larger_than_the_vocab(tmp_path: Path) -> None:
    model, cfg, _ = train_tiny("bitnet")
    run = make_run(tmp_path / "run", model, cfg, make_tokenizer(vocab_size=400))
    with pytest.raises(HGFError, match=r"the tokenizer has \d+ tokens, more than the model.s model.vocab_size=320"):
        export_run(run, tmp_path / "m.hgf")
    assert not (tmp_path / "m.hgf").exists()


def test_plain_weights_file_is_not_a_packed_model(tmp_path: Path, capsys) -> None:
    model, cfg, _ = train_tiny("bitnet")
    run = make_run(tmp_path / "run", model, cfg)
    assert main(["generate", str(run / "model.safetensors"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hgf: error:") and "not an hgf packed model" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Where export writes: never over an existing file without --force, never over the run's files


def _bitnet_run(tmp_path: Path) -> Path:
    model, cfg, _ = train_tiny("bitnet")
    return make_run(tmp_path / "run", model, cfg, make_tokenizer())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_export_refuses_an_existing_file_without_force(tmp_path: Path, capsys) -> None:
    run, out = _bitnet_run(tmp_path), tmp_path / "m.hgf"
    out.write_text("someone's file")
    assert main(["export", str(run), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"hgf: error: {out}: already exists; pass --force to overwrite it\n"
    assert out.read_text() == "someone's file"
    assert main(["export", str(run), "-o", str(out), "--force"]) == 0
    assert read_header(out).packing == "i2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hgf", "run"]  # no temp file left


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "metrics.jsonl", "m.hgf"])
def test_export_never_writes_over_a_file_of_the_run(name: str, tmp_path: Path, capsys) -> None:
    run = _bitnet_run(tmp_path)
    (run / "m.hgf").write_text("an earlier export")
    before = _files(run)
    for force in ([], ["--force"]):
        assert main(["export", str(run), "-o", str(run / name), *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hgf: error: {run / name}: already exists and belongs to the run "
                              "being exported") and err.count("\n") == 1
    # also through another name for the same folder
    link = tmp_path / "link"
    link.symlink_to(run)
    assert main(["export", str(link), "-o", str(run / name), "--force"]) == 2
    assert _files(run) == before
    assert main(["generate", str(run), "--prompt", "Tom", "--max-new-tokens", "2"]) == 0


def test_export_never_writes_over_the_tokenizer_it_reads(tmp_path: Path, capsys) -> None:
    run = _bitnet_run(tmp_path)
    tok = tmp_path / "tok.json"
    tok.write_bytes((run / "tokenizer.json").read_bytes())
    assert main(["export", str(run), "-o", str(tok), "--tokenizer", str(tok), "--force"]) == 2
    assert "belongs to the run being exported" in capsys.readouterr().err
    assert tok.read_bytes() == (run / "tokenizer.json").read_bytes()


def test_export_to_a_folder_writes_run_name_hgf(tmp_path: Path, capsys) -> None:
    run, folder = _bitnet_run(tmp_path), tmp_path / "out"
    folder.mkdir()
    assert main(["export", str(run), "-o", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{folder / 'run.hgf'}: packing i2")
    assert read_header(folder / "run.hgf").tokenizer_json == make_tokenizer().to_str()
    assert main(["export", str(run), "-o", str(folder)]) == 2  # now it exists
    assert f"{folder / 'run.hgf'}: already exists" in capsys.readouterr().err
    (folder / "run.hgf").unlink()
    (folder / "run.hgf").mkdir()
    assert main(["export", str(run), "-o", str(folder), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(run)]) == 0  # a new file inside the run is fine
    assert (run / "run.hgf").is_file()
