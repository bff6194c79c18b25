"""`python -m hgf.infer.bench` runs end to end on a debug-size model (speed is not asserted)."""

from __future__ import annotations

import json

from hgf.infer.bench import main
from infer_utils import ROOT  # noqa: F401  (sets one torch thread for the tiny models)

RECORD_KEYS = {"system", "arm", "packing", "threads", "cpu_ms_per_token", "tok_per_s",
               "prompt_tok_per_s"}


def test_bench_infer_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--size", "debug", "--tokens", "4", "--rounds", "1",
                 "--gemv-sizes", "128", "--kv-cache", "f16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GEMV" in text and "hgf-diff" in text and "native" in text and "float32" in text
    res = json.loads(out.read_text())
    rows = {(r["arm"], r["packing"]): r for r in res["decode"]}
    native = {(a, p) for a in ("bitnet-std", "hgf-std", "hgf-diff", "tequila-std", "ptqtp-std")
              for p in ("i2", "tq1")} | {("sherry-std", "sherry")}
    assert set(rows) == native
    for r in (rows[k] for k in native):
        assert set(r) >= RECORD_KEYS and r["system"] == "hgf" and r["engine"] == "native"
        assert r["tokens"] == 4 and r["cpu_ms_per_token"] > 0 and r["tok_per_s"] > 0
        assert r["prompt_tok_per_s"] > 0 and r["threads"] == 1 and r["kv_cache"] == "f16"
        # a debug model is smaller than the RSS noise: the peak's delta is only present
        assert r["speedup_vs_reference"] > 0 and isinstance(r["peak_rss_delta_bytes"], int)
    ref = {(r["arm"], r["packing"]): r for r in res["decode_reference"]}
    assert set(ref) == native | {("dense-diff", "float32"), ("dense-diff", "bfloat16")}
    assert all(r["engine"] == "reference" for r in ref.values())
    # packed weights: ternary at 2 bits, the rest in fp16 (native) or float32 (reference)
    assert rows["hgf-diff", "i2"]["weight_bytes"] < ref["hgf-diff", "i2"]["weight_bytes"]
    assert ref["hgf-diff", "i2"]["weight_bytes"] < ref["dense-diff", "float32"]["weight_bytes"]
    assert {r["n"] for r in res["gemv"]} == {128}
    assert {r["method"] for r in res["gemv"]} >= {"ternary i2", "ternary sherry"}
