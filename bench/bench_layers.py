"""Time and peak memory of the PAC layers against the matching torch layers, as ratios measured in one run.

    python bench/bench_layers.py                          # 256x256 and 512x512, default implementation
    python bench/bench_layers.py --sizes 256 --impls auto unfold --threads 1

Pairs: PacConv2d / nn.Conv2d, PacConvTranspose2d (stride 2) / nn.ConvTranspose2d, PacPool2d / nn.AvgPool2d.
Workload: batch 1, 32 -> 32 channels, 16-channel guide, 5x5 kernels; sizes are output resolutions.
Each (layer, implementation, size) is measured in two fresh subprocesses (bench/_common.py): one times medians of
--repeats calls, no grad and forward+backward, for every --threads setting in turn (0: torch's default); the other
measures peak memory, the growth of the peak RSS during one call over the RSS with inputs and parameters allocated,
with one thread. "x" is the ratio to the torch layer measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os

from _common import IMPLS, DEFAULT_IMPL, mb, median_time, pac_kwargs, peak_growth, ratio, run_worker, set_threads

CHANNELS, GUIDE_CHANNELS, KERNEL = 32, 16, 5
LAYERS = ("conv", "conv_transpose", "pool")
BASELINE = {"conv": "nn.Conv2d", "conv_transpose": "nn.ConvTranspose2d", "pool": "nn.AvgPool2d"}
MODES = ("nograd", "fwdbwd")


def _build(layer: str, impl: str, size: int):
    """Inputs and a closure running one case's module; ``impl`` is 'torch' or a key of ``IMPLS``."""
    import torch
    import torch.nn as nn
    import pac

    torch.manual_seed(0)
    c, k = CHANNELS, KERNEL
    in_size = size // 2 if layer == "conv_transpose" else size
    x = torch.randn(1, c, in_size, in_size, requires_grad=True)
    guide = torch.randn(1, GUIDE_CHANNELS, size, size, requires_grad=True)
    if impl == "torch":
        module = {"conv": lambda: nn.Conv2d(c, c, k, padding=k // 2),
                  "conv_transpose": lambda: nn.ConvTranspose2d(c, c, k, stride=2, padding=k // 2, output_padding=1),
                  "pool": lambda: nn.AvgPool2d(k, stride=1, padding=k // 2)}[layer]()
        return (x,), lambda: module(x)
    kw = pac_kwargs(impl)
    module = {"conv": lambda: pac.PacConv2d(c, c, k, padding=k // 2, **kw),
              "conv_transpose": lambda: pac.PacConvTranspose2d(c, c, k, stride=2, padding=k // 2, output_padding=1,
                                                               **kw),
              "pool": lambda: pac.PacPool2d(k, stride=1, padding=k // 2, **kw)}[layer]()
    return (x, guide), lambda: module(x, guide)


def _modes(inputs, run) -> dict:
    """Closures for the no-grad and forward+backward modes of one case."""
    import torch

    def no_grad():
        with torch.no_grad():
            return run()

    def forward_backward():
        out = run()
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None

    return {"nograd": no_grad, "fwdbwd": forward_backward}


def _worker(kind: str, layer: str, impl: str, size: int, repeats: int, threads: str) -> dict:
    """kind 'time': medians of both modes for every thread count of the comma-separated ``threads``;
    kind 'memory': the peak memory of both modes, with one thread."""
    if kind == "memory":
        set_threads(1)
        for fn in _modes(*_build(layer, impl, 8)).values():
            fn()  # warm-up on a tiny input: lazy imports, autograd engine, allocator set-up
        return {f"{mode}_bytes": peak_growth(fn) for mode, fn in _modes(*_build(layer, impl, size)).items()}
    modes = _modes(*_build(layer, impl, size))
    result = {}
    for count in map(int, threads.split(",")):
        result[count] = {"threads": set_threads(count),
                         **{f"{mode}_s": median_time(fn, repeats) for mode, fn in modes.items()}}
    return result


def _measure(layer: str, impl: str, size: int, args) -> dict:
    threads = ",".join(map(str, args.threads))
    timed = run_worker(__file__, ("time", layer, impl, size, args.repeats, threads))
    result = run_worker(__file__, ("memory", layer, impl, size, 1, 1), memory=True)
    result["time"] = {t: timed if "error" in timed else timed[str(t)] for t in args.threads}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="output resolutions")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--impls", nargs="+", default=[DEFAULT_IMPL], choices=list(IMPLS), help="PAC implementations")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, layer, impl, size, repeats, threads = args.worker
        print(json.dumps(_worker(kind, layer, impl, int(size), int(repeats), threads)))
        return

    import torch

    print(f"torch {torch.__version__}, batch 1, {CHANNELS}->{CHANNELS} channels, {GUIDE_CHANNELS}-channel guide, "
          f"{KERNEL}x{KERNEL}; x = ratio to the torch layer; load average {os.getloadavg()[0]:.2f}")
    print("times in ms (no grad, forward+backward) per thread count; peak memory in MB with 1 thread\n")
    header = f"{'layer':<16}{'size':>5}  {'impl':<20}"
    for threads in args.threads:
        header += f"|{'T=' + (str(threads) if threads else 'dflt'):<7}{'nograd':>8}{'x':>6}{'fwd+bwd':>9}{'x':>6} "
    header += f"|{'mem nograd':>11}{'x':>6}{'fwd+bwd':>9}{'x':>6}"
    print(header)
    print("-" * len(header))
    for layer in args.layers:
        for size in args.sizes:
            results = {impl: _measure(layer, impl, size, args) for impl in ["torch", *args.impls]}
            base = results["torch"]
            for impl, r in results.items():
                name = BASELINE[layer] if impl == "torch" else f"PAC {impl}"
                line = f"{layer:<16}{size:>5}  {name:<20}"
                for threads in args.threads:
                    t, bt = r["time"][threads], base["time"][threads]
                    if "error" in t:
                        line += f"|{'failed':>36} "
                        continue
                    line += f"|{t['threads']:>7}"
                    for mode in MODES:
                        line += f"{t[mode + '_s'] * 1e3:{8 if mode == 'nograd' else 9}.1f}"
                        line += f"{ratio(t[mode + '_s'], bt.get(mode + '_s')):>6}"
                    line += " "
                line += "|"
                for mode in MODES:
                    key = mode + "_bytes"
                    line += f"{mb(r.get(key)):>{11 if mode == 'nograd' else 9}}{ratio(r.get(key), base.get(key)):>6}"
                print(line)
                for error in {v["error"] for v in [r, *r["time"].values()] if "error" in v}:
                    print(f"  {error}")
        print()


if __name__ == "__main__":
    main()
