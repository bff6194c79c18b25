"""Inference: export to the packed file, the packed runtime, loading (hgf.infer.load) and
generation.

    hgf.infer.export_run(run_dir, "model.hgf")        # training run -> packed file
    model, header = hgf.infer.load_packed("model.hgf", "cpu")
    tokenizer = tokenizers.Tokenizer.from_str(header.tokenizer_json)
    hgf.infer.generate(model, tokenizer, "Once upon a time", max_new_tokens=64)
"""

from hgf.infer.export import byte_breakdown, export_model, export_run, format_breakdown, pack_model
from hgf.infer.format import FORMAT_NAME, FORMAT_VERSION, PackedHeader, read_header
from hgf.infer.generate import Generation, generate, generate_ids, sample_next
from hgf.infer.load import detect_format, load_for_generation, resolve_device
from hgf.infer.packed import PackedTernaryLinear, load_packed, swap_packed_layers

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "Generation", "PackedHeader", "PackedTernaryLinear",
    "byte_breakdown", "detect_format", "export_model", "export_run", "format_breakdown",
    "generate", "generate_ids", "load_for_generation", "load_packed", "pack_model", "read_header",
    "resolve_device", "sample_next", "swap_packed_layers",
]
