"""Hugging Face interop (optional extra ``hgf[hf]``).

    hgf.hf.modeling        HGFConfig / HGFForCausalLM: the hgf Transformer as a transformers model
                           (needs transformers >= 5; imported only when used)
    hgf.hf.convert         run directory <-> Hugging Face directory <-> bitnet checkpoint
    hgf.hf.bitnet_import   checkpoints in the transformers ``bitnet`` packed format -> hgf model
                           (torch + safetensors only)
    hgf.hf.bitnet_export   hgf model -> ``bitnet`` checkpoint (what can be exported; the packed
                           tensors, config.json; the drift of dropping an HGF correction)
"""

from __future__ import annotations

from hgf.errors import HGFError


def require_transformers() -> None:
    """Raise a one-line HGFError when transformers (>= 5) is not installed."""
    try:
        import transformers
    except ImportError:
        raise HGFError("the Hugging Face interop needs transformers: pip install 'hgf[hf]'") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise HGFError(f"the Hugging Face interop needs transformers >= 5 "
                       f"(found {transformers.__version__}): pip install -U 'hgf[hf]'")
