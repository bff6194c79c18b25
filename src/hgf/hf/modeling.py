"""The hgf Transformer as a Hugging Face transformers model (transformers >= 5.4).

``HGFPreTrainedConfig`` (``model_type = "hgf"``) holds the resolved hgf Config dict (every section;
the model is built from ``model``, ``quant`` and ``hgf``). The usual transformers attributes (``vocab_size``,
``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``,
``tie_word_embeddings``) are derived from it and never read back, so the hgf dict is the only
source of truth.

``HGFForCausalLM`` wraps the SAME ``hgf.model.Transformer`` as its ``model`` attribute, so its state
dict is the hgf state dict under the prefix ``model.`` (``model.layers.0.attn.q_proj.weight`` ...)
and ``save_pretrained`` / ``from_pretrained`` write and read plain safetensors.

Generation: ``generate()`` works with every transformers decoding strategy that needs only logits.
With ``use_cache=True`` (the default) the keys/values of each layer go to a transformers
``DynamicCache`` through a small adapter that stands in for hgf's own static ``KVCache`` (same
``update(start, k, v)`` interface), so decoding feeds one token per step; ``use_cache=False``
recomputes the whole prefix every step. Both give the same tokens as a plain greedy loop over
``Transformer.forward`` (tests/test_hf.py). Padding is not supported: the attention mask, when
given, must be all ones (one prompt length per batch).

The cache's name changed in transformers 5.24: up to 5.23 ``generate()`` passes it as
``past_key_values=`` and reads it back from ``output.past_key_values``; from 5.24 on it passes
``cache=`` and reads ``output["cache"]`` (``past_key_values`` is deprecated). ``forward`` takes
either keyword and returns the cache under the field that the installed ``CausalLMOutputWithPast``
declares (``CACHE_FIELD``), so cached decoding continues where the cache ends on every 5.x.

Importing this module registers the pair with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hgf.hf import require_transformers

require_transformers()

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from hgf.config import Config, config_from_dict  # noqa: E402
from hgf.errors import HGFError  # noqa: E402
from hgf.model.attention import rope_cache  # noqa: E402
from hgf.model.hgf_linear import NO_CLAMP, HGFLinear  # noqa: E402
from hgf.model.transformer import Transformer, lm_loss  # noqa: E402

MODEL_TYPE = "hgf"
# Name of the cache in model outputs (and of the keyword generate() passes): "cache" from
# transformers 5.24 on, "past_key_values" before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HGFPreTrainedConfig(PreTrainedConfig):
    """transformers config of an hgf model (``hgf.config.HGFConfig`` is the ``[hgf]`` section of
    the hgf Config): ``hgf_config`` is the hgf Config as a nested dict."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    hgf_config: dict | None = None
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        cfg = config_from_dict(self.hgf_config or {}, "HGFPreTrainedConfig.hgf_config")
        self.hgf_config = cfg.to_dict()
        m = cfg.model
        self.vocab_size = m.vocab_size
        self.hidden_size = m.d_model
        self.num_hidden_layers = m.n_layers
        self.num_attention_heads = m.n_heads
        self.max_position_embeddings = m.max_seq_len
        self.tie_word_embeddings = m.tie_embeddings

    @classmethod
    def from_hgf(cls, cfg: Config, **kwargs: Any) -> HGFPreTrainedConfig:
        return cls(hgf_config=cfg.to_dict(), **kwargs)

    def to_hgf(self) -> Config:
        return config_from_dict(self.hgf_config, "HGFPreTrainedConfig.hgf_config")


class _LayerCache(nn.Module):
    """Stands in for hgf's ``KVCache`` of one layer: ``update(start, k, v)`` appends to layer
    ``layer_idx`` of a transformers ``Cache`` and returns all keys/values so far."""

    def __init__(self, cache: Cache, layer_idx: int) -> None:
        super().__init__()
        self.hf_cache = cache
        self.layer_idx = layer_idx

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hf_cache.update(k, v, self.layer_idx)


class HGFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HGFPreTrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: HGFPreTrainedConfig) -> None:
        super().__init__(config)
        self.model = Transformer(config.to_hgf())
        self.post_init()

    @classmethod
    def from_transformer(cls, model: Transformer, **config_kwargs: Any) -> HGFForCausalLM:
        """Wrap an existing hgf Transformer (no copy, no re-initialisation)."""
        with torch.device("meta"):
            hf = cls(HGFPreTrainedConfig.from_hgf(model.cfg, **config_kwargs))
        hf.model = model
        return hf

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Parameters are initialised by ``Transformer.__init__`` (hgf's own init); here only the
        non-persistent buffers are (re)computed, which ``from_pretrained`` leaves empty. A checkpoint
        that lacks some parameters is refused rather than silently half-initialised."""
        if isinstance(module, Transformer):
            m = module.cfg.model
            cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
            names = dict(module.named_parameters())
            missing = [n for n, p in names.items() if not getattr(p, "_is_hf_initialized", False)]
            if missing and len(missing) < len(names):
                raise HGFError(f"checkpoint lacks {len(missing)} hgf parameters, e.g. {missing[:3]}")
        elif isinstance(module, HGFLinear):
            module.gate_max.fill_(NO_CLAMP)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[b, t, vocab]`` for ``input_ids`` ``[b, t]`` placed after the cached tokens;
        ``labels`` (same shape, -100 = ignore) give the shifted next-token loss. The cache may be
        given as ``cache`` (transformers >= 5.24) or ``past_key_values`` (older 5.x), not both."""
        if input_ids is None:
            raise ValueError("HGFForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("hgf models do not support padding: attention_mask must be all ones "
                             "(use one prompt length per batch)")
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("give the cache as `cache` or `past_key_values`, not both")
            cache = past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0

        attns = [layer.attn for layer in self.model.layers]
        saved = [a.cache for a in attns]
        for i, a in enumerate(attns):
            a.cache = _LayerCache(cache, i) if cache is not None else None
        try:
            logits = self.model(input_ids, start)
        finally:
            for a, c in zip(attns, saved, strict=True):
                a.cache = c
        loss = lm_loss(logits[:, :-1], labels[:, 1:]) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


AutoConfig.register(MODEL_TYPE, HGFPreTrainedConfig, exist_ok=True)
AutoModelForCausalLM.register(HGFPreTrainedConfig, HGFForCausalLM, exist_ok=True)
