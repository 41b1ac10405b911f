"""Peak resident memory and length helpers shared by the benchmarks (Linux: /proc/self/status and clear_refs).

Written by hand: psutil reads the current RSS but cannot reset or read the kernel's peak (VmHWM), which is what a step's
peak memory needs."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def read_status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def malloc_trim() -> None:
    """Give freed heap back to the OS, so the next peak counts every byte the step allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> int:
    """Collect, trim, reset VmHWM to the current RSS and return that RSS in bytes."""
    gc.collect()
    malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError as err:
        raise RuntimeError("peak memory needs Linux's /proc/self/clear_refs") from err
    return read_status_kib("VmRSS") * 1024


class PeakRSS:
    """Peak RSS during a block minus the RSS at its start, in bytes: `rss = PeakRSS(); ...; rss.stop()`."""

    def __init__(self):
        self.start = reset_peak()

    def stop(self) -> int:
        return max(0, read_status_kib("VmHWM") * 1024 - self.start)


def parse_length(text: str) -> int:
    """'2K' -> 2048, '1.5K' -> 1536, '300' -> 300."""
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
