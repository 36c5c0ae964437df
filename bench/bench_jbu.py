"""Joint bilateral upsampling x16 of one 500x741 image, no grad: wall time and peak memory.

    python bench/bench_jbu.py                            # JBU_33_20_0.0625, the project's JointBilateral model
    python bench/bench_jbu.py --kernel-sizes 33 65       # also a 65x65 window (capped: see --mem-cap-gb)
    python bench/bench_jbu.py --height 250 --width 370   # smaller, quicker

The model is built from its CLI name, ``JBU_<ks>_20_0.0625``, and run through task_jointUpsampling.main's
``apply_model``, as the program runs it: the 32x47 low-res depth (the ceiling of 500x741 / 16) is upsampled to
512x752 with the guide resized to that size, and the result is resized back to 500x741. The content is synthetic:
a random RGB guide in [0, 1] and a smooth low-res depth map.

Each measurement runs in a fresh subprocess (see bench/_common.py). Memory is the peak RSS growth of one call over
the resident size with the inputs and the model allocated. To keep a large window from taking the machine down,
the subprocess's address space is capped (``resource.setrlimit(RLIMIT_AS)``) at its size after a small warm-up
run plus --mem-cap-gb: a case that needs more fails with an allocation error, reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import resource

from _common import DEFAULT_IMPL, IMPLS, mb, median_time, peak_growth, run_worker, set_pac_impl, set_threads

FACTOR, SCALE_COLOR, SCALE_SPACE = 16, 20, 0.0625


def _model_name(kernel_size: int) -> str:
    return f"JBU_{kernel_size}_{SCALE_COLOR}_{SCALE_SPACE}"


def _inputs(height: int, width: int):
    """A random RGB guide and a smooth low-res depth map of ceil(size / FACTOR) pixels."""
    import torch

    torch.manual_seed(0)
    low_h, low_w = -(-height // FACTOR), -(-width // FACTOR)
    rows = torch.linspace(0, 3, low_h).view(-1, 1)
    cols = torch.linspace(0, 4, low_w).view(1, -1)
    depth = 2.0 + torch.sin(rows) * torch.cos(cols) + 0.3 * rows  # metres, smooth
    return depth.view(1, 1, low_h, low_w), torch.rand(1, 3, height, width)


def _cap_address_space(extra_bytes: int) -> None:
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + extra_bytes, resource.RLIM_INFINITY))


def _worker(kind: str, kernel_size: int, impl: str, height: int, width: int, repeats: int, threads: int,
            cap_gb: float) -> dict:
    import torch
    from task_jointUpsampling.main import apply_model
    from task_jointUpsampling.models import create_model

    torch.set_grad_enabled(False)
    result = {"threads": set_threads(threads)}
    net = create_model(_model_name(kernel_size), FACTOR).eval()
    set_pac_impl(net, impl)
    apply_model(net, *_inputs(FACTOR * 4, FACTOR * 6), FACTOR)  # warm-up: lazy imports, thread pools
    low, guide = _inputs(height, width)
    result["inputs_bytes"] = low.nbytes + guide.nbytes
    _cap_address_space(int(cap_gb * 2**30))
    run = lambda: apply_model(net, low, guide, FACTOR)  # noqa: E731
    try:
        if kind == "memory":
            result["peak_bytes"] = peak_growth(run)
        else:
            result["seconds"] = median_time(run, repeats, warmup=0)
    except (RuntimeError, MemoryError) as error:  # the address-space cap
        result["error"] = f"over the {cap_gb:g} GB cap ({str(error).splitlines()[0][:80]})"
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[33], help="JBU windows (odd)")
    parser.add_argument("--impls", nargs="+", default=[DEFAULT_IMPL], choices=list(IMPLS), help="PAC implementations")
    parser.add_argument("--height", type=int, default=500)
    parser.add_argument("--width", type=int, default=741)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0,
                        help="address space a run may add before it fails (default 8)")
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, ks, impl, h, w, repeats, threads, cap = args.worker
        print(json.dumps(_worker(kind, int(ks), impl, int(h), int(w), int(repeats), int(threads), float(cap))))
        return

    import torch

    print(f"torch {torch.__version__}, x{FACTOR} joint bilateral upsampling of one {args.height}x{args.width} image, "
          f"no grad; load average {os.getloadavg()[0]:.2f}")
    header = f"{'model':<20}{'impl':<8}{'threads':>8}{'wall s':>9}{'peak MB':>10}{'inputs MB':>11}"
    print(header)
    print("-" * len(header))
    for ks in args.kernel_sizes:
        for impl in args.impls:
            common = (ks, impl, args.height, args.width, args.repeats, args.threads, args.mem_cap_gb)
            timed = run_worker(__file__, ("time", *common))
            memory = run_worker(__file__, ("memory", *common), memory=True)
            name = _model_name(ks)
            errors = [r["error"] for r in (timed, memory) if "error" in r]
            if errors:
                print(f"{name:<20}{impl:<8} failed: {errors[0]}")
                continue
            print(f"{name:<20}{impl:<8}{timed['threads']:>8}{timed['seconds']:9.2f}{mb(memory['peak_bytes']):>10}"
                  f"{mb(memory['inputs_bytes']):>11}")


if __name__ == "__main__":
    main()
