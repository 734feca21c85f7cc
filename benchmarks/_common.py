"""Shared helpers of the benchmarks: device / dtype choice, timing, peak memory, machine description."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the (fp32) trainable parts next to the low-precision frozen weights."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {_cpu_model()}",
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def release_cpu_heap_caching() -> bool:
    """Make glibc return freed memory to the OS at once, so RSS follows live tensors.

    glibc keeps freed blocks resident (and raises its mmap threshold after large frees), so
    after warmup a block's RSS hardly moves. Serving every block >= 64 KiB by mmap and trimming
    the heap on free makes the RSS delta of a call its real peak allocation. It slows later
    allocations (fresh pages), so call it only after all timings. Returns False off glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) and libc.mallopt(_M_TRIM_THRESHOLD, 0)
    libc.malloc_trim(0)
    return bool(ok)


class PeakMemory:
    """Peak memory of a block, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at entry.
    CPU: the peak resident set size above the RSS at entry, sampled every millisecond from
    /proc/self/statm (accurate after ``release_cpu_heap_caching()``), and
    (``maxrss_growth_mb``) how far the block raised the process's ``resource`` ru_maxrss
    high-water mark (0 once an earlier block went higher).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.maxrss_growth_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        self._base = _rss_bytes()
        self._peak = self._base
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0  # KiB on Linux
        self.maxrss_growth_mb = grown / 1024


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(contenders: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, dict]:
    """Time several functions round-robin so that load drifts (shared machines) hit all alike.

    Each contender is warmed up ``warmup`` times, then round ``r`` runs every contender once, in
    an order rotated by ``r``.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            runs[name].append(time_once(contenders[name], device))
    return {
        name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs_ms": v}
        for name, v in runs.items()
    }


def measure_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one (untimed) call: ``peak_mem_mb`` (+ ``maxrss_growth_mb`` on CPU)."""
    with PeakMemory(device) as mem:
        fn()
    out = {"peak_mem_mb": mem.peak_mb}
    if device.type != "cuda":
        out["maxrss_growth_mb"] = mem.maxrss_growth_mb
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def safe_name(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def quickstart_features(config: Path, parts=None):
    """The encoder features of a cached-recipe quickstart's train + test samples, cached as the
    recipe caches them: ``(cfg, samples, train_idx, test_idx, features in sample order, reused)``.
    ``parts``: the config's already loaded ``cached.load_parts(cfg)`` (loaded here when None)."""
    import torch

    from epalm.data.registry import get_dataset
    from epalm.recipes import cached

    cfg = cached.load_cached_config(config)
    spec = get_dataset(cfg.dataset)
    train = spec.load(cfg.root, cfg.train_split, **cfg.dataset_options)
    test = spec.load(cfg.root, cfg.test_split, **cfg.dataset_options)
    samples = train + test
    parts = parts if parts is not None else cached.load_parts(cfg)
    processor = cached.build_processor(cfg, spec, parts.tokenizer)
    x_all, row, info = cached.media_features(cfg, parts, processor, cached.media_of(samples), torch.device("cpu"),
                                             print)
    feats = x_all[[row[s.media_id] for s in samples]]
    return (cfg, samples, list(range(len(train))), list(range(len(train), len(samples))), feats,
            info["reused"])


def easy_vqa_attributes(samples) -> dict[str, dict[str, str]]:
    """``{media_id: {"color": ..., "shape": ...}}``: each easy-VQA image's colour and shape, read from
    the answers of its own open questions (an image may lack one of them)."""
    from collections import defaultdict

    attrs: dict[str, dict[str, str]] = defaultdict(dict)
    for s in samples:
        if s.answer_type in ("color", "shape"):
            attrs[s.media_id][s.answer_type] = s.answers[0]
    return dict(attrs)
