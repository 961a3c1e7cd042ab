"""What the benchmarks measure with: time (best of n), memory (RSS, a guard on available memory),
page-cache state, the machine's load, the commit and CPU — shared by every script of ``bench/``.

The benchmarks are scripts, not a package: they import this as ``measure`` (``bench/`` is on
``sys.path`` when a script runs; the ones the tests load put it there).
"""

from __future__ import annotations

import _thread
import ctypes
import gc
import os
import platform
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def io_read_bytes() -> int | None:
    """Bytes this process has read from storage (page-cache hits excluded); None where unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of this run's own files in ``folder`` (only
    those: the machine is shared), so the next read comes from the disk."""
    for path in folder.iterdir():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)  # pages not yet written back cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(folder: Path) -> None:
    """Read every file of ``folder`` once, so the next run finds it in the page cache."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def as_float32_cache(src: Path, dst: Path) -> None:
    """The cache in ``src`` rewritten as the float32 entries the cache kept before (module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name.endswith(".log"):
            shutil.copy(path, dst / path.name)
            continue
        if not path.name.endswith(".svd.safetensors"):
            continue
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k).to(torch.float32) for k in ("U", "S", "V")}
        meta["dtype"] = "float32"
        save_file(tensors, str(dst / path.name), metadata=meta)


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Measure:
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    cpu_seconds: float = 0.0
    load_end: float = 0.0
    vram_extra: int | None = None
    aborted: str = ""             # why the memory guard stopped the run ("" = it finished)
    io_read: int | None = None    # bytes this process read from storage during the run (/proc/self/io)

    @property
    def extra_rss(self) -> int:
        return self.rss_peak - self.rss_start


class measured:
    """Context manager: wall time, peak RSS sampled every ``interval`` s, CPU time, CUDA peak."""

    def __init__(self, device: torch.device, interval: float = 0.02, min_free_bytes: int = 0):
        self.device = device
        self.interval = interval
        self.min_free = min_free_bytes
        self.m = Measure()
        self._stop = threading.Event()

    def _sample(self):
        i = 0
        while not self._stop.wait(self.interval):
            self.m.rss_peak = max(self.m.rss_peak, rss_bytes())
            i += 1
            if self.min_free and i % 10 == 0 and not self.m.aborted:
                free = mem_available()
                if free is not None and free < self.min_free:
                    # The machine is shared: stop this run before the kernel's OOM killer picks a victim.
                    self.m.aborted = (f"memory guard: {free / 2**30:.1f} GiB available < {self.min_free / 2**30:.1f} "
                                      f"GiB with this process at {rss_bytes() / 2**30:.1f} GiB RSS")
                    _thread.interrupt_main()

    def __enter__(self) -> Measure:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._vram0 = torch.cuda.memory_allocated()
        self.m.rss_start = self.m.rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu0 = ru.ru_utime + ru.ru_stime
        self._io0 = io_read_bytes()
        self._t0 = time.perf_counter()
        return self.m

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.m.seconds = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.m.cpu_seconds = ru.ru_utime + ru.ru_stime - self._cpu0
        io = io_read_bytes()
        self.m.io_read = None if io is None or self._io0 is None else io - self._io0
        self._stop.set()
        self._thread.join()
        self.m.rss_peak = max(self.m.rss_peak, rss_bytes())
        self.m.load_end = os.getloadavg()[0]
        if self.device.type == "cuda":
            self.m.vram_extra = torch.cuda.max_memory_allocated() - self._vram0
        return False


# --------------------------------------------------------------------------------------------
# Time, load, machine
# --------------------------------------------------------------------------------------------


def best_and_result(fn, repeat: int = 3):
    """``(seconds, result)``: the shortest of ``repeat`` timed calls of ``fn`` (the one other work
    disturbed least) and what the last call returned."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def best(fn, repeat: int = 3) -> float:
    """The shortest of ``repeat`` timed calls of ``fn``, in seconds."""
    return best_and_result(fn, repeat)[0]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, printed with a result: a busy machine's times are not comparable."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %ad", "--date=iso"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "lorax"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head or '?'}" + (", lorax/ has uncommitted changes" if dirty else ", lorax/ clean")


def cpu_model() -> str:
    """The CPU's name with its family, model and whether it has AVX-512: cloud CPUs are often just
    "AMD EPYC", and the generations behind that name differ in what this work measures (docs/performance.md)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break  # the first processor's entry is enough
    except OSError:
        pass
    if "model name" in info:
        vector = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
        return f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, {vector})"
    return platform.processor() or "unknown CPU"
