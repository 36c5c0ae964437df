"""Fused Triton PAC forward (pac_triton) against pac.py's two steps and a plain convolution, on CUDA.

    python bench/bench_triton.py                          # 512 and 1024 pixels, float16 and float32
    python bench/bench_triton.py --sizes 2048 --dtypes fp16 --repeats 20
    TRITON_INTERPRET=1 python bench/bench_triton.py --device cpu --sizes 8 --repeats 1   # smoke run only

Inference (torch.inference_mode), batch 1, C -> C channels, a 3-channel guide, k x k gaussian kernel.
Rows: F.conv2d with the same weight (the floor), pac.packernel2d + pac.pacconv2d (lean path), and
pac_triton.pacconv2d_gaussian. Times are medians; peak is the CUDA memory allocated during one call
beyond the inputs; "max diff" compares against the two-step result. On the CPU (interpreter) the
times only exercise the script: they say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pac  # noqa: E402
import pac_triton  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int):
    """(median seconds, peak extra bytes or None, output) of ``fn``."""
    fn()  # warm-up: Triton compiles here
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), peak, out


def _cases(x, guide, weight, bias, k):
    padding = k // 2
    return {
        "F.conv2d": lambda: F.conv2d(x, weight, bias.to(x.dtype), padding=padding),
        "pac two-step (lean)": lambda: pac.pacconv2d(
            x, pac.packernel2d(guide, kernel_size=k, padding=padding)[0], weight, bias.to(x.dtype), padding=padding),
        "pac_triton fused": lambda: pac_triton.pacconv2d_gaussian(x, guide, weight, bias, padding=padding),
    }


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image side in pixels")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not pac_triton.is_available() or (device.type == "cuda" and not torch.cuda.is_available()):
        raise SystemExit("bench_triton needs triton and a CUDA GPU (or TRITON_INTERPRET=1 with --device cpu "
                         "for a smoke run)")

    header = f"{'size':>6} {'dtype':<6}{'implementation':<22}{'ms':>10}{'peak MB':>10}{'max diff':>11}"
    print(f"torch {torch.__version__}, device {device}, batch 1, {args.channels}->{args.channels} channels, "
          f"3-channel guide, {args.kernel}x{args.kernel}")
    print(header + "\n" + "-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        for name in args.dtypes:
            dtype = DTYPES[name]
            x = torch.randn(1, args.channels, size, size, generator=gen).to(device, dtype)
            guide = torch.randn(1, 3, size, size, generator=gen).to(device, dtype)
            weight = (torch.randn(args.channels, args.channels, args.kernel, args.kernel, generator=gen)
                      / args.kernel / args.channels ** 0.5).to(device, dtype)
            bias = torch.zeros(args.channels, device=device)
            with torch.inference_mode():
                results = {label: _measure(fn, device, args.repeats)
                           for label, fn in _cases(x, guide, weight, bias, args.kernel).items()}
            two_step = results["pac two-step (lean)"][2].float()
            for label, (seconds, peak, out) in results.items():
                peak_s = f"{peak / 2**20:10.1f}" if peak is not None else f"{'n/a':>10}"
                diff = "" if label == "F.conv2d" else f"{(out.float() - two_step).abs().max().item():11.2e}"
                print(f"{size:>6} {name:<6}{label:<22}{seconds * 1e3:10.2f}{peak_s}{diff}")


if __name__ == "__main__":
    main()
