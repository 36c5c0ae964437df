"""Time and peak memory of the PAC layers against the matching torch layers, as ratios measured in one run.

    python bench/bench_layers.py                          # 256x256 and 512x512, default implementation
    python bench/bench_layers.py --sizes 256 --impls auto unfold --threads 1
    python bench/bench_layers.py --dims 3                 # the 3-D layers: 32^3 and 64^3

Pairs: PacConv2d / nn.Conv2d, PacConvTranspose2d (stride 2) / nn.ConvTranspose2d, PacPool2d / nn.AvgPool2d, and
their 3-D forms with --dims 3. Workload: batch 1, 32 -> 32 channels, 16-channel guide, 5x5 kernels (3-D: 16 -> 16
channels, 8-channel guide, 3x3x3 kernels); sizes are output resolutions (cubes in 3-D).
Each (layer, size) is timed in one fresh subprocess (bench/_common.py) that builds the torch layer and the PAC
layer of every implementation and calls them in turn, --repeats rounds, no grad and forward+backward, for every
--threads setting (0: torch's default): medians, interleaved so that the machine's drifts hit all alike. Peak memory
is measured in a fresh subprocess per implementation, the growth of the peak RSS during one call over the RSS with
inputs and parameters allocated, with one thread. "x" is the ratio to the torch layer measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os

from _common import (IMPLS, DEFAULT_IMPL, interleaved_median_times, mb, pac_kwargs, peak_growth, ratio, run_worker,
                     set_threads)

# (channels, guide channels, kernel size, default sizes) per number of spatial dimensions
WORKLOADS = {2: (32, 16, 5, [256, 512]), 3: (16, 8, 3, [32, 64])}
LAYERS = ("conv", "conv_transpose", "pool")
BASELINE = {"conv": "nn.Conv{d}d", "conv_transpose": "nn.ConvTranspose{d}d", "pool": "nn.AvgPool{d}d"}
MODES = ("nograd", "fwdbwd")


def _build(layer: str, impl: str, size: int, dims: int):
    """Inputs and a closure running one case's module; ``impl`` is 'torch' or a key of ``IMPLS``."""
    import torch
    import torch.nn as nn
    import pac

    torch.manual_seed(0)
    c, guide_channels, k, _ = WORKLOADS[dims]
    in_size = size // 2 if layer == "conv_transpose" else size
    x = torch.randn(1, c, *(in_size,) * dims, requires_grad=True)
    guide = torch.randn(1, guide_channels, *(size,) * dims, requires_grad=True)
    if impl == "torch":
        conv, conv_transpose, pool = {2: (nn.Conv2d, nn.ConvTranspose2d, nn.AvgPool2d),
                                      3: (nn.Conv3d, nn.ConvTranspose3d, nn.AvgPool3d)}[dims]
        module = {"conv": lambda: conv(c, c, k, padding=k // 2),
                  "conv_transpose": lambda: conv_transpose(c, c, k, stride=2, padding=k // 2, output_padding=1),
                  "pool": lambda: pool(k, stride=1, padding=k // 2)}[layer]()
        return (x,), lambda: module(x)
    kw = pac_kwargs(impl)
    conv, conv_transpose, pool = {2: (pac.PacConv2d, pac.PacConvTranspose2d, pac.PacPool2d),
                                  3: (pac.PacConv3d, pac.PacConvTranspose3d, pac.PacPool3d)}[dims]
    module = {"conv": lambda: conv(c, c, k, padding=k // 2, **kw),
              "conv_transpose": lambda: conv_transpose(c, c, k, stride=2, padding=k // 2, output_padding=1, **kw),
              "pool": lambda: pool(k, stride=1, padding=k // 2, **kw)}[layer]()
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


def _worker(kind: str, layer: str, impls: str, size: int, dims: int, repeats: int, threads: str) -> dict:
    """kind 'time': for every thread count of the comma-separated ``threads``, the interleaved medians of both modes
    of every implementation of the comma-separated ``impls`` ('torch' or keys of ``IMPLS``); kind 'memory': the
    peak memory of both modes of the one implementation ``impls``, with one thread."""
    if kind == "memory":
        set_threads(1)
        for fn in _modes(*_build(layer, impls, 8, dims)).values():
            fn()  # warm-up on a tiny input: lazy imports, autograd engine, allocator set-up
        return {f"{mode}_bytes": peak_growth(fn) for mode, fn in _modes(*_build(layer, impls, size, dims)).items()}
    cases = {impl: _modes(*_build(layer, impl, size, dims)) for impl in impls.split(",")}
    result = {}
    for count in map(int, threads.split(",")):
        in_use = set_threads(count)
        medians = {mode: interleaved_median_times({impl: modes[mode] for impl, modes in cases.items()}, repeats)
                   for mode in MODES}
        result[count] = {impl: {"threads": in_use, **{f"{mode}_s": medians[mode][impl] for mode in MODES}}
                         for impl in cases}
    return result


def _measure(layer: str, impls: list, size: int, args) -> dict:
    """``{impl: {"time": {threads: ...}, "<mode>_bytes": ...}}`` for 'torch' and every PAC implementation."""
    threads = ",".join(map(str, args.threads))
    timed = run_worker(__file__, ("time", layer, ",".join(impls), size, args.dims, args.repeats, threads))
    results = {}
    for impl in impls:
        results[impl] = run_worker(__file__, ("memory", layer, impl, size, args.dims, 1, 1), memory=True)
        results[impl]["time"] = {t: timed if "error" in timed else timed[str(t)][impl] for t in args.threads}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, default=2, choices=sorted(WORKLOADS), help="spatial dimensions")
    parser.add_argument("--sizes", type=int, nargs="+", help="output resolutions (default 256 512; 3-D: 32 64)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--impls", nargs="+", default=[DEFAULT_IMPL], choices=list(IMPLS), help="PAC implementations")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, layer, impl, size, dims, repeats, threads = args.worker
        print(json.dumps(_worker(kind, layer, impl, int(size), int(dims), int(repeats), threads)))
        return
    channels, guide_channels, k, default_sizes = WORKLOADS[args.dims]
    args.sizes = args.sizes or default_sizes

    import torch

    print(f"torch {torch.__version__}, batch 1, {channels}->{channels} channels, {guide_channels}-channel guide, "
          f"{'x'.join([str(k)] * args.dims)}; x = ratio to the torch layer; load average {os.getloadavg()[0]:.2f}")
    print("times in ms (no grad, forward+backward) per thread count; peak memory in MB with 1 thread\n")
    header = f"{'layer':<16}{'size':>5}  {'impl':<20}"
    for threads in args.threads:
        header += f"|{'T=' + (str(threads) if threads else 'dflt'):<7}{'nograd':>8}{'x':>6}{'fwd+bwd':>9}{'x':>6} "
    header += f"|{'mem nograd':>11}{'x':>6}{'fwd+bwd':>9}{'x':>6}"
    print(header)
    print("-" * len(header))
    for layer in args.layers:
        for size in args.sizes:
            results = _measure(layer, ["torch", *args.impls], size, args)
            base = results["torch"]
            for impl, r in results.items():
                name = BASELINE[layer].format(d=args.dims) if impl == "torch" else f"PAC {impl}"
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
