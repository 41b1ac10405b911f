"""Make ring-flash-attn's kernels importable everywhere: real flash-attn on CUDA, the CPU stand-in elsewhere.

Two problems are solved here, in this order:

1. ring-flash-attn binds `flash_attn.flash_attn_interface._flash_attn_*` at import time, and flash-attn only exists on
   CUDA machines. `install_flash_attn()` uses the real package when it imports; otherwise it registers
   `trl_longpo.attention.flash_attn_cpu` as `flash_attn` and `flash_attn.flash_attn_interface` in `sys.modules` (with
   proper `__spec__`s: transformers' import-time probes call `importlib.util.find_spec("flash_attn")`, which raises
   on a module whose `__spec__` is None). It must therefore run BEFORE any ring-flash-attn kernel module is imported.
   transformers still reports FlashAttention-2 unavailable (it also checks the installed distribution's metadata),
   which is what we want: nothing else is misled into calling kernels the stand-in does not provide.

2. `import ring_flash_attn` fails on transformers 5: the package `__init__` imports its HF adapter, which imports
   `is_flash_attn_greater_or_equal_2_10` (removed from transformers). We never want that adapter anyway (it patches
   the "flash_attention_2" implementation and rejects transformers 5). `load_ring_flash_attn()` therefore imports
   only the kernel submodules. Options considered:
     - pre-seed `sys.modules["ring_flash_attn.adapters"]` with a fake adapter: the package's own `__init__` then runs,
       but a fake module lives under a real name and the fake names must track the adapter's exports;
     - fork / vendor the package: rules out upgrades;
     - (chosen) a stand-in *parent package*: a module object named `ring_flash_attn` whose `__path__` is the real
       package directory (found with `importlib.util.find_spec`, which does not execute `__init__`). Importing
       `ring_flash_attn.<kernel module>` then loads the real, unmodified submodules; their relative imports
       (`.utils`, `.triton_utils`) resolve through `__path__`. It depends only on the submodule names, which are
       the package's stable layout since 0.1. If `ring_flash_attn` already imported fine (a future release without
       the problem, or older transformers), the real package is used as is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

FlashAttnBackend = Literal["flash_attn", "cpu_stand_in"]

_STAND_IN_MARKER = "__trl_longpo_stand_in__"
_INTERFACE_FUNCTIONS = (
    "flash_attn_varlen_func",
    "_flash_attn_forward",
    "_flash_attn_backward",
    "_flash_attn_varlen_forward",
    "_flash_attn_varlen_backward",
)


def _stand_in_module(name: str, is_package: bool) -> types.ModuleType:
    module = types.ModuleType(name, "trl_longpo's CPU stand-in for flash-attn (PyTorch's CPU kernels; see trl_longpo.attention)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
    if is_package:
        module.__path__ = []
    setattr(module, _STAND_IN_MARKER, True)
    return module


def flash_attn_backend() -> FlashAttnBackend | None:
    """Which flash-attn `sys.modules` currently holds: "flash_attn", "cpu_stand_in", or None if none is loaded."""
    module = sys.modules.get("flash_attn")
    if module is None:
        return None
    return "cpu_stand_in" if getattr(module, _STAND_IN_MARKER, False) else "flash_attn"


def install_flash_attn(force_stand_in: bool = False) -> FlashAttnBackend:
    """Make `flash_attn.flash_attn_interface` importable and return which backend it is.

    The real package is preferred; the stand-in is installed when it does not import (no CUDA build), or when
    `force_stand_in` is set (debugging on a CUDA machine). Idempotent. Must run before ring-flash-attn's kernel modules
    are imported, since they bind the functions at import time.
    """
    current = flash_attn_backend()
    if current == "cpu_stand_in" or (current == "flash_attn" and not force_stand_in):
        return current
    bound = [n for n in sys.modules if n.startswith("ring_flash_attn.") and n.rsplit(".", 1)[-1] != "utils"]
    if current == "flash_attn" and bound:
        raise RuntimeError(
            f"ring-flash-attn modules {bound} are already bound to the real flash_attn; "
            "call install_flash_attn(force_stand_in=True) before they are imported"
        )
    if not force_stand_in:
        try:
            importlib.import_module("flash_attn.flash_attn_interface")
            return "flash_attn"
        except (ImportError, OSError) as err:  # not installed, or installed without a usable CUDA build
            if importlib.util.find_spec("flash_attn") is not None:
                logger.warning("flash_attn is installed but failed to import (%s); using the CPU stand-in.", err)
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        del sys.modules[name]  # a failed import's leftovers, or the real package when forced
    from trl_longpo.attention import flash_attn_cpu

    package = _stand_in_module("flash_attn", is_package=True)
    interface = _stand_in_module("flash_attn.flash_attn_interface", is_package=False)
    for name in _INTERFACE_FUNCTIONS:
        setattr(interface, name, getattr(flash_attn_cpu, name))
    package.flash_attn_interface = interface
    package.flash_attn_varlen_func = interface.flash_attn_varlen_func
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = interface
    return "cpu_stand_in"


@dataclass(frozen=True)
class RingKernels:
    """The ring-flash-attn entry points trl_longpo uses (real, unmodified functions from the installed package)."""

    zigzag_varlen: Callable
    llama3_varlen: Callable
    llama3_prepare_cu_seqlens: Callable
    local_varlen: Callable  # flash_attn_varlen_func: plain (ring-less) attention for an SP group of one
    backend: FlashAttnBackend


_KERNEL_MODULES = ("zigzag_ring_flash_attn_varlen", "llama3_flash_attn_varlen")
_kernels: RingKernels | None = None


def _import_parent_without_init() -> types.ModuleType:
    package = sys.modules.get("ring_flash_attn")
    if package is not None:
        return package
    spec = importlib.util.find_spec("ring_flash_attn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("ring-flash-attn is not installed: pip install 'ring-flash-attn>=0.1.8,<0.2'")
    package = types.ModuleType("ring_flash_attn", "ring-flash-attn's kernels, loaded without its HF adapter")
    package.__spec__ = importlib.machinery.ModuleSpec(
        "ring_flash_attn", loader=None, origin=spec.origin, is_package=True
    )
    package.__spec__.submodule_search_locations = list(spec.submodule_search_locations)
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["ring_flash_attn"] = package
    return package


def load_ring_flash_attn(force_stand_in: bool = False) -> RingKernels:
    """Install flash-attn (real or stand-in) and import ring-flash-attn's zigzag and llama3 varlen kernels."""
    global _kernels
    backend = install_flash_attn(force_stand_in=force_stand_in)
    if _kernels is not None and _kernels.backend == backend:
        return _kernels
    package = _import_parent_without_init()
    zigzag, llama3 = (importlib.import_module(f"ring_flash_attn.{name}") for name in _KERNEL_MODULES)
    for module in (zigzag, llama3):  # what `import ring_flash_attn` would expose, minus the adapter
        for attr in dir(module):
            if attr.startswith(("zigzag_ring_flash_attn_varlen", "llama3_flash_attn")):
                setattr(package, attr, getattr(module, attr))
    _kernels = RingKernels(
        zigzag_varlen=zigzag.zigzag_ring_flash_attn_varlen_func,
        llama3_varlen=llama3.llama3_flash_attn_varlen_func,
        llama3_prepare_cu_seqlens=llama3.llama3_flash_attn_prepare_cu_seqlens,
        local_varlen=importlib.import_module("flash_attn.flash_attn_interface").flash_attn_varlen_func,
        backend=backend,
    )
    return _kernels
