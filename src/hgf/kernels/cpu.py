"""Build and load the C++ CPU kernel library (``csrc/ternary_cpu.cpp`` and the native decoder
``csrc/decode_cpu.cpp``, which includes it and ``csrc/sherry_cpu.cpp``: one translation unit) at
first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` into the torch extensions
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; rebuilt only when the
source changes) and registers the op ``hgf::ternary_linear_cpu`` and the class
``torch.classes.hgf.Decoder`` (hgf.infer.engine). Without a compiler (or ninja),
or when the build fails, :func:`load` warns once and returns False, and ``ternary_linear`` uses
the PyTorch reference. ``HGF_NO_CPU_KERNEL=1`` disables the kernel.

Threads: ``torch.get_num_threads()``, on the kernel's own work-claiming pool (csrc/pool.h),
which does not stall when a worker is descheduled on a busy machine.

The ISA is chosen at run time, the same for both packings (i2, tq1): AVX-512 (VNNI + VBMI)
micro-kernels where the CPU has them, else AVX2 micro-kernels (vpmaddubsw), else
auto-vectorised portable loops (non-x86 CPUs). :func:`isa` reports or forces it (tests and
``python -m hgf.kernels.bench --isa`` use that to run the slower paths on an AVX-512 machine).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

from hgf.kernels.reference import ternary_linear_fake

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "decode_cpu.cpp"  # #includes ternary_cpu.cpp
ISAS = ("portable", "avx2", "avx512-vnni")


@functools.cache
def load() -> bool:
    """Build (first use only) and load the kernel; False with one warning if unavailable."""
    if os.environ.get("HGF_NO_CPU_KERNEL", "") not in ("", "0"):
        return False
    try:
        from torch.utils.cpp_extension import load as load_extension

        # torch rebuilds when the .cpp changes, not a header: name the build by all sources
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir())))
        load_extension(
            name=f"hgf_ternary_cpu_{digest.hexdigest()[:10]}",
            sources=[str(SOURCE)],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-pthread"],
            extra_ldflags=["-pthread"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: all fall back
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"hgf: CPU ternary kernel unavailable ({msg}); using the PyTorch "
                      "reference (slow)", stacklevel=2)
        return False
    _register_fake()
    return True


@torch.compiler.assume_constant_result
def available() -> bool:
    """:func:`load`, as a constant for torch.compile (it builds at most once, eagerly)."""
    return load()


@functools.cache
def _register_fake() -> None:
    torch.library.register_fake("hgf::ternary_linear_cpu")(ternary_linear_fake)
    torch.library.register_fake("hgf::sherry_linear_cpu")(ternary_linear_fake)


def isa(request: str | None = None) -> str:
    """The kernel's active ISA; ``request`` (one of ``ISAS``) selects one (capped at
    what the CPU supports). Raises RuntimeError when the kernel is unavailable."""
    if not load():
        raise RuntimeError("the hgf CPU ternary kernel is not available")
    level = -1 if request is None else ISAS.index(request)
    return ISAS[torch.ops.hgf.ternary_cpu_isa(level)]
