"""llama.cpp interop through GGUF files (optional extra ``hgf[gguf]``: the ``gguf`` package, and
``llama-cpp-python`` to run the files from Python). The mapping, tolerances and refusals are in
docs/GGUF.md.

    hgf.gguf.export    hgf model -> GGUF: ternary arms -> llama.cpp ``bitnet`` (TQ2_0 | TQ1_0 +
                       per-tensor ``.scale``), the fp16 arm -> ``llama``; the HGF correction as
                       a GGUF LoRA adapter (gate folded into B); the tokenizer inside the file
    hgf.gguf.tokenizer byte-level BPE tokenizer <-> the GGUF ``tokenizer.ggml.*`` keys
    hgf.gguf.import_   a TQ2_0/TQ1_0 ``bitnet`` GGUF -> hgf model (``hgf convert x.gguf --to run``)
    hgf.gguf.llama     llama.cpp through llama-cpp-python's low-level C API (load, tokenize,
                       logits, a C-level greedy decode loop)
    hgf.gguf.peer      ``hgf bench infer --peer llama.cpp``: hgf's decode against llama.cpp's
"""

from __future__ import annotations

from hgf.errors import HGFError


def require_gguf():
    """The ``gguf`` module, or a one-line HGFError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise HGFError("GGUF export/import needs the gguf package: pip install 'hgf[gguf]' "
                       "(or pip install gguf)") from None
    return gguf
