"""`python -m hgf.infer.bench` runs end to end on a debug-size model (speed is not asserted)."""

from __future__ import annotations

import json

from hgf.infer.bench import main
from infer_utils import ROOT  # noqa: F401  (sets one torch thread for the tiny models)


def test_bench_infer_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--size", "debug", "--tokens", "4", "--gemv-sizes", "128",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GEMV" in text and "packed i2 HGF" in text and "dense float32" in text
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["decode"]}
    assert set(rows) == {"dense float32", "dense bfloat16", "packed i2 HGF", "packed tq1 HGF"}
    assert rows["dense float32"]["speedup_vs_f32"] == 1.0
    assert all(r["tokens"] == 4 and r["decode_tok_s"] > 0 for r in rows.values())
    # packed weights: ternary at 2 bits, the rest (embeddings/head/norms/λ/A/B') in float32
    assert rows["packed i2 HGF"]["weight_bytes"] < rows["dense float32"]["weight_bytes"]
    assert {r["n"] for r in res["gemv"]} == {128}
