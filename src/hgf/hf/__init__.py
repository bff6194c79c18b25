"""Hugging Face interop (optional extra ``hgf[hf]``).

    hgf.hf.modeling        HGFPreTrainedConfig / HGFForCausalLM: the hgf Transformer as a
                           transformers model
                           (needs transformers >= 5.4; imported only when used)
    hgf.hf.convert         run directory <-> Hugging Face directory <-> bitnet checkpoint
    hgf.hf.bitnet_import   checkpoints in the transformers ``bitnet`` packed format -> hgf model
                           (torch + safetensors only)
    hgf.hf.bitnet_export   hgf model -> ``bitnet`` checkpoint (what can be exported; the packed
                           tensors, config.json; the drift of dropping an HGF correction)
"""

from __future__ import annotations

import re
from pathlib import Path

from hgf.data.sources import EOT
from hgf.errors import HGFError

# The lowest transformers tested (constraints-lowest.txt): 5.4 is the first whose PreTrainedConfig is
# a dataclass with __post_init__, which HGFPreTrainedConfig builds on.
MIN_TRANSFORMERS = (5, 4)


def require_transformers() -> None:
    """Raise a one-line HGFError when transformers (>= 5.4) is not installed."""
    try:
        import transformers
    except ImportError:
        raise HGFError("the Hugging Face interop needs transformers: pip install 'hgf[hf]'") from None
    found = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if found < MIN_TRANSFORMERS:
        raise HGFError(f"the Hugging Face interop needs transformers >= "
                       f"{'.'.join(map(str, MIN_TRANSFORMERS))} (found {transformers.__version__}): "
                       "pip install -U 'hgf[hf]'")


def hf_tokenizer(path: Path):
    """A PreTrainedTokenizerFast of a ``tokenizers`` file and the id of its end-of-text token."""
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        raise HGFError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    eos = tok.get_vocab().get(EOT)
    if eos is not None:
        tok.eos_token = EOT
    return tok, eos
