"""Whether this CPU's u8 x s8 integer kernels saturate, for the int8 methods' ``reduce_range`` default.

ONNX Runtime runs MatMulInteger / DynamicQuantizeMatMul / QLinearMatMul / QLinearConv (and the
QDQ graphs it fuses into them) with uint8 activations x int8 weights. On x86-64 CPUs without VNNI
(AVX2 only, e.g. AMD EPYC before Zen 4, Intel before Cascade Lake / Alder Lake) the kernel's
``vpmaddubsw`` adds two u8 x s8 products into an int16 *with saturation*: ``255 * 127 * 2``
overflows it, so full-range int8 weights can lose accuracy there (ORT documents this; its advice
is ``reduce_range``, 7-bit weights: ``255 * 64 * 2 = 32640`` fits). With VNNI (``avx512_vnni``,
``avx_vnni``; ``amx_int8`` CPUs have it too) the products are summed in int32 and nothing
saturates; ARM kernels (``sdot``/``udot``, or widening multiplies) do not saturate either.

The answer, :func:`u8s8_saturates`:

* ``MODELPRESS_INT8_VNNI=1`` (the CPU has VNNI: full 8-bit weights) or ``=0`` (it has not:
  7-bit weights) forces it, read on every call (tests and cross-machine builds use it);
* else on x86-64 Linux the ``flags`` of ``/proc/cpuinfo``; on other x86-64 systems numpy's CPU
  feature table (``AVX512VNNI``); x86 with neither answer is taken to saturate (the safe side:
  7-bit weights cost a little accuracy, saturation can cost a lot);
* non-x86 CPUs do not saturate.

The probe runs once per process (cached); the environment override is not cached.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_VAR", "REDUCE_RANGE_HELP", "Int8Cpu", "resolve_reduce_range", "u8s8_saturates"]

ENV_VAR = "MODELPRESS_INT8_VNNI"
REDUCE_RANGE_HELP = (
    "in 7 bits ([-63, 63]) so that u8 x s8 integer kernels cannot saturate; None: decide from the CPU, True on "
    "x86-64 without VNNI (AVX2 only: vpmaddubsw saturates int16 sums of two products), False with VNNI (avx512_vnni, "
    f"avx_vnni) or on ARM; {ENV_VAR}=0|1 tells it the CPU lacks/has VNNI (for a model built on one machine to run on another)"
)
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86 = {"x86_64", "amd64", "x64", "i386", "i486", "i586", "i686", "x86"}


@dataclass(frozen=True)
class Int8Cpu:
    """The answer: whether u8 x s8 kernels saturate here, and why (for the pass's figures)."""

    saturates: bool
    why: str


def u8s8_saturates() -> Int8Cpu:
    """Whether ORT's u8 x s8 kernels saturate on this CPU (see the module docstring)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return Int8Cpu(False, f"{ENV_VAR}={forced}: CPU taken to have VNNI")
    if forced in ("0", "false", "no", "off"):
        return Int8Cpu(True, f"{ENV_VAR}={forced}: CPU taken to lack VNNI, u8s8 kernels saturate")
    return _probe()


@functools.cache
def _probe() -> Int8Cpu:
    machine = platform.machine().lower()
    if machine not in _X86:
        return Int8Cpu(False, f"{machine or 'unknown'} CPU: its int8 kernels do not saturate")
    flags = _cpuinfo_flags() if platform.system() == "Linux" else None
    if flags is None:
        flags = _numpy_flags()
    if flags is None:
        return Int8Cpu(True, "x86 CPU whose VNNI support is unknown: u8s8 kernels may saturate")
    found = [f for f in _VNNI_FLAGS if f in flags]
    if found:
        return Int8Cpu(False, f"CPU with {found[0]}")
    return Int8Cpu(True, "CPU without VNNI: u8s8 kernels saturate")


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return None


def _numpy_flags() -> set[str] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # type: ignore[attr-defined]
    except ImportError:
        return None
    return {"avx512_vnni"} if __cpu_features__.get("AVX512VNNI") else set()


def resolve_reduce_range(option: bool | None) -> tuple[bool, str]:
    """``reduce_range`` as a method uses it (the option, or the CPU's answer when it is None), and the
    line its figures record, e.g. ``"true (CPU without VNNI: u8s8 kernels saturate)"``."""
    if option is not None:
        return option, f"{str(option).lower()} (set by option)"
    cpu = u8s8_saturates()
    return cpu.saturates, f"{str(cpu.saturates).lower()} ({cpu.why})"
