"""Time and peak memory of the PAC layers against the matching torch layers, measured in one run.

    python bench/bench_layers.py                 # 256x256 and 512x512, both PAC implementations
    python bench/bench_layers.py --sizes 256 --skip-native

Every (layer, implementation, size) is measured in fresh subprocesses. Peak memory is the growth of
the process's peak resident set size (``ru_maxrss``) during one forward+backward, over the resident
size just before it (inputs and parameters already allocated), with glibc's mmap threshold fixed so
that freed buffers really return to the OS and the peak reflects live tensors. Times are medians,
measured in a separate subprocess with the default allocator.
Workload (from the project's issue): batch 1, 32 -> 32 channels, 16-channel guide, 5x5 kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, GUIDE_CHANNELS, KERNEL = 32, 16, 5
LAYERS = ("conv", "conv_transpose", "pool")
BASELINE = {"conv": "nn.Conv2d", "conv_transpose": "nn.ConvTranspose2d", "pool": "nn.AvgPool2d"}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(layer: str, impl: str, size: int):
    """Module, inputs and a closure running it, for one case. ``size`` is the output resolution."""
    import torch
    import torch.nn as nn
    import pac

    torch.manual_seed(0)
    c, k = CHANNELS, KERNEL
    in_size = size // 2 if layer == "conv_transpose" else size
    x = torch.randn(1, c, in_size, in_size, requires_grad=True)
    guide = torch.randn(1, GUIDE_CHANNELS, size, size, requires_grad=True)
    native = impl == "native"
    if impl == "torch":
        module = {"conv": lambda: nn.Conv2d(c, c, k, padding=k // 2),
                  "conv_transpose": lambda: nn.ConvTranspose2d(c, c, k, stride=2, padding=k // 2, output_padding=1),
                  "pool": lambda: nn.AvgPool2d(k, stride=1, padding=k // 2)}[layer]()
        return (x,), lambda: module(x)
    module = {"conv": lambda: pac.PacConv2d(c, c, k, padding=k // 2, native_impl=native),
              "conv_transpose": lambda: pac.PacConvTranspose2d(c, c, k, stride=2, padding=k // 2, output_padding=1,
                                                               native_impl=native),
              "pool": lambda: pac.PacPool2d(k, stride=1, padding=k // 2, native_impl=native)}[layer]()
    return (x, guide), lambda: module(x, guide)


def _measure_memory(layer: str, impl: str, size: int) -> dict:
    import torch

    inputs, run = _build(layer, impl, size)
    rss_before = _current_rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = run()
    out.backward(torch.ones_like(out))
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # If the import-time peak was higher than this run's, the growth is not visible: report nothing.
    return {"peak_bytes": peak_after - rss_before if peak_after > peak_before else None}


def _measure_time(layer: str, impl: str, size: int, repeats: int) -> dict:
    import torch

    inputs, run = _build(layer, impl, size)

    def forward_backward():
        out = run()
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None

    def timed(fn):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    with torch.no_grad():
        t_fwd = timed(run)
    return {"forward_s": t_fwd, "forward_backward_s": timed(forward_backward)}


def _worker(kind: str, layer: str, impl: str, size: int, repeats: int, threads: int) -> dict:
    """Run one measurement in a fresh interpreter. Memory runs with glibc's mmap threshold fixed, so that
    freed buffers return to the OS and the peak RSS tracks live tensors; timing runs with the default
    allocator (the fixed threshold makes every large allocation page-fault)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if kind == "memory":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--worker", kind, layer, impl, str(size), str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_case(layer: str, impl: str, size: int, repeats: int, threads: int) -> dict:
    return {**_worker("memory", layer, impl, size, repeats, threads),
            **_worker("time", layer, impl, size, repeats, threads)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="output resolutions")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-native", action="store_true", help="skip the memory-hungry native_impl=True path")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, layer, impl, size, repeats = args.worker
        result = (_measure_memory(layer, impl, int(size)) if kind == "memory"
                  else _measure_time(layer, impl, int(size), int(repeats)))
        print(json.dumps(result))
        return

    impls = ["torch", "lean"] + ([] if args.skip_native else ["native"])
    header = (f"{'layer':<20}{'size':>6}  {'impl':<22}{'fwd ms':>9}{'x':>7}{'fwd+bwd ms':>12}{'x':>7}"
              f"{'peak MB':>10}{'x':>7}")
    print(f"torch {__import__('torch').__version__}, {args.threads} threads, batch 1, {CHANNELS}->{CHANNELS} "
          f"channels, {GUIDE_CHANNELS}-channel guide, {KERNEL}x{KERNEL}; x = ratio to the torch layer\n")
    print(header)
    print("-" * len(header))
    for layer in args.layers:
        for size in args.sizes:
            results = {impl: _run_case(layer, impl, size, args.repeats, args.threads) for impl in impls}
            base = results["torch"]
            for impl in impls:
                r = results[impl]
                name = BASELINE[layer] if impl == "torch" else f"PAC {impl}"
                mem, base_mem = r["peak_bytes"], base["peak_bytes"]
                mem_s = f"{mem / 2**20:10.1f}" if mem else f"{'n/a':>10}"
                mem_x = f"{mem / base_mem:7.2f}" if mem and base_mem else f"{'':>7}"
                print(f"{layer:<20}{size:>6}  {name:<22}{r['forward_s'] * 1e3:9.1f}"
                      f"{r['forward_s'] / base['forward_s']:7.2f}{r['forward_backward_s'] * 1e3:12.1f}"
                      f"{r['forward_backward_s'] / base['forward_backward_s']:7.2f}{mem_s}{mem_x}")
        print()


if __name__ == "__main__":
    main()
