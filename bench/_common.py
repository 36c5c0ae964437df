"""Shared pieces of the CPU benchmarks: the PAC implementation switch, timing, and peak memory in fresh subprocesses.

Every measurement runs in a fresh interpreter (``run_worker``), so that one case's allocations, thread pools and
caches do not leak into the next. Peak memory is the growth of the process's peak resident set size (VmHWM, reset
before the call through /proc/self/clear_refs) during a call, over the resident size just before it (inputs and
parameters already allocated). Memory workers run
with glibc's mmap threshold fixed, so that freed buffers return to the OS and the peak tracks live tensors; timing
workers keep the default allocator (a fixed threshold makes every large allocation page-fault).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The PAC implementations a benchmark can select, as layer keyword arguments; the first is the default.
IMPLS = {name: dict(impl=name) for name in ("auto", "unfold")}
DEFAULT_IMPL = next(iter(IMPLS))
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def pac_kwargs(impl: str) -> dict:
    """Keyword arguments that make a PAC layer use implementation ``impl`` (a key of ``IMPLS``)."""
    return dict(IMPLS[impl])


def set_pac_impl(module, impl: str) -> None:
    """Switch every PAC layer inside ``module`` (built with the default implementation) to ``impl``."""
    import pac

    for layer in module.modules():
        if isinstance(layer, (pac.PacConv2d, pac.PacConvTranspose2d, pac.PacPool2d)):
            for name, value in pac_kwargs(impl).items():
                setattr(layer, name, value)


def set_threads(threads: int) -> int:
    """Use ``threads`` torch threads (0 keeps torch's default); returns the count in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to its current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_growth(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which running ``fn`` raised the peak RSS above the RSS just before it. Where the peak cannot be
    reset, None when the peak before (imports, set-up, an earlier call) was higher than anything ``fn`` reached."""
    reset = _reset_peak_rss()
    before, peak_before = current_rss(), _peak_rss()
    result = fn()
    peak_after = _peak_rss()
    del result
    if not reset and peak_after <= peak_before:
        return None
    return max(0, peak_after - before)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls, in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_median_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall time in seconds of each of ``fns`` (name -> callable), called in turn ``repeats`` times after
    ``warmup`` untimed rounds: a machine that slows down or speeds up during the run affects all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def run_worker(script: str, args: Sequence[str], memory: bool = False, timeout: Optional[float] = None) -> dict:
    """Run ``script --worker ARGS`` in a fresh interpreter and return the JSON dict it prints last.

    ``memory`` fixes glibc's mmap threshold (see the module docstring). A worker that fails gives
    ``{"error": <its last stderr line>}`` instead of stopping the whole benchmark.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if memory:
        env.update(LIVE_MEMORY_ENV)
    cmd = [sys.executable, script, "--worker", *map(str, args)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(num_bytes: Optional[float]) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def ratio(value: Optional[float], reference: Optional[float]) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "n/a"
