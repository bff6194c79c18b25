"""The one registry of module and parameter roles (docs/STYLE.md §13).

Every consumer that treats parameters differently by what they are reads the role from here
instead of its own isinstance chain: the optimizer groups (hgf.model.params), the memory report
(hgf.memory), the packed file's layout and the export (hgf.infer.format, hgf.infer.export), and
the GGUF exporter.

Module roles (:func:`role_of`):

    ternary    a ternary projection (BitLinear and its subclasses): packed at export
    ptqtp      a two-plane ternary projection fitted without training (PTQTPLinear, no
               parameters: its planes and row scales are buffers), packed as two planes
    dense      a full-precision block projection (``nn.Linear``; the fp16 / diff_only arms)
    embedding  the token embedding (``nn.Embedding``)
    head       the LM head (the ``lm_head`` linear; tied to the embedding or not)
    other      anything else that holds parameters: norms, λ vectors of differential attention

Parameter roles (:func:`param_role`), what a parameter is whatever module holds it:

    ternary     the latent weight of a ternary projection (the optimizer decays it; export
                ternarizes and packs it; memory counts it at the packing's bits per weight)
    correction  the low-rank A, B of a corrected projection (FP16 at export)
    gate        a gate (its own optimizer group; folded into B at export, so never stored)
    bias        the scale λ of a dead-zone bias b = λ·Σ_{W_t = 0} W (Tequila; a parameter
                whether learned or not, frozen when not): no weight decay; export folds it into
                the float32 bias ``N.bias [out]`` of its projection; memory counts that bias
    dense | embedding | head | other   the module's role, for every parameter of such a module

A layer class carries its roles as class attributes: ``hgf_role`` (the module role) and
``hgf_param_roles`` ({parameter name: role}; a parameter not named there takes the module
role). Modules from torch (``nn.Linear``, ``nn.Embedding``, norms) get theirs from
:func:`role_of`'s fallback below, the one place that looks at classes.

Adding a linear kind (Tequila, Sherry, a two-plane ternary, a per-channel or input-dependent
gate, ...): subclass BitLinear (a ternary projection) or ``nn.Module``, set ``hgf_role`` and
``hgf_param_roles`` (reuse the roles above where the parameter means the same thing: a gate of
any shape is ``gate``), give it ``rank`` and ``folded_terms()`` if it has a correction (what
every exporter folds, see HGFLinear), and register its factory in ``LINEARS``
(hgf.model.linear). A parameter that means something new gets a new role here, and each
consumer above then says what to do with it (each raises KeyError on a role it does not know,
so none ignores it silently); tests/test_registries.py checks that every parameter of every
arm has a known role.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

MODULE_ROLES = ("ternary", "ptqtp", "dense", "embedding", "head", "other")
PARAM_ROLES = ("ternary", "correction", "gate", "bias", "dense", "embedding", "head", "other")
HEAD_NAME = "lm_head"


def role_of(name: str, module: nn.Module) -> str:
    """The role of the module called ``name`` (its ``named_modules`` path) in a model."""
    role = getattr(type(module), "hgf_role", None)
    if role is not None:
        return role
    if name == HEAD_NAME or name.endswith(f".{HEAD_NAME}"):
        return "head"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "dense"
    return "other"


def param_role(name: str, module: nn.Module, param_name: str) -> str:
    """The role of ``module``'s own parameter ``param_name`` (``module`` called ``name``)."""
    return getattr(type(module), "hgf_param_roles", {}).get(param_name) or role_of(name, module)


def param_roles(model: nn.Module, dedup: bool = True
                ) -> Iterator[tuple[str, nn.Module, str, nn.Parameter, str]]:
    """``(module name, module, parameter name, parameter, role)`` of every parameter, in
    ``named_modules`` order; with ``dedup`` a tied parameter appears once (where it is first)."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if dedup:
                if id(p) in seen:
                    continue
                seen.add(id(p))
            yield mod_name, mod, p_name, p, param_role(mod_name, mod, p_name)


def modules_with_role(model: nn.Module, role: str) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` whose role is ``role``."""
    for name, mod in model.named_modules():
        if role_of(name, mod) == role:
            yield name, mod
