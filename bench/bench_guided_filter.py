"""A guided filter, no grad: normalised PacPool2d against kornia's joint bilateral blur (optional dependency).

    pip install -c constraints.txt -r requirements-bench.txt      # kornia
    python bench/bench_guided_filter.py                           # 512x512, 9x9, torch's default threads
    python bench/bench_guided_filter.py --size 256 --threads 1 --impls auto unfold

Both filter a 3-channel image with a guide, in float32. PAC's Gaussian kernel ``exp(-0.5 * ||g_i - g_j||^2)`` on a
guide divided by sigma_color is kornia's colour kernel with the squared-L2 distance (``color_distance_type='l2'``).
Two cases:
  colour     3-channel guide; PacPool2d has no spatial term, so kornia runs with sigma_space = 1e9 (a flat
             spatial kernel up to float32 rounding).
  bilateral  guide = create_YXRGB(guide, sigma_space, sigma_color) (5 channels): the PAC kernel is then the full
             bilateral kernel, and kornia runs with that sigma_space.
Borders differ (PAC renormalises over the taps inside the image, kornia pads with reflection), so "max diff" is
taken over interior pixels. Times are medians; memory is the peak RSS growth of one call in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import json
import os

from _common import DEFAULT_IMPL, IMPLS, mb, median_time, pac_kwargs, peak_growth, ratio, run_worker, set_threads

SIGMA_COLOR, SIGMA_SPACE, FLAT_SIGMA_SPACE = 0.1, 3.0, 1e9
CASES = ("colour", "bilateral")


def _build(case: str, impl: str, size: int, kernel: int):
    """Closures computing the filtered image with PAC or kornia, and the interior slice for comparisons."""
    import torch

    torch.manual_seed(0)
    image, guide = torch.rand(1, 3, size, size), torch.rand(1, 3, size, size)
    if impl == "kornia":
        import kornia

        sigma_space = SIGMA_SPACE if case == "bilateral" else FLAT_SIGMA_SPACE
        return lambda: kornia.filters.joint_bilateral_blur(image, guide, kernel, SIGMA_COLOR, (sigma_space,) * 2,
                                                           color_distance_type="l2")
    import pac
    from paccrf import create_YXRGB

    features = create_YXRGB(guide, SIGMA_SPACE, SIGMA_COLOR) if case == "bilateral" else guide / SIGMA_COLOR
    pool = pac.PacPool2d(kernel, padding=kernel // 2, normalize_kernel=True, **pac_kwargs(impl))
    return lambda: pool(image, features)


def _worker(kind: str, case: str, impl: str, size: int, kernel: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    result = {"threads": set_threads(threads)}
    run = _build(case, impl, size, kernel)
    if kind == "memory":
        run()  # warm-up: lazy imports and thread pools outside the peak
        result["peak_bytes"] = peak_growth(run)
    elif kind == "time":
        result["seconds"] = median_time(run, repeats)
    else:  # "diff": PAC against kornia on the interior
        r = kernel // 2
        diff = run() - _build(case, "kornia", size, kernel)()
        result["max_diff"] = diff[..., r:-r, r:-r].abs().max().item()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--kernel", type=int, default=9)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--impls", nargs="+", default=[DEFAULT_IMPL], choices=list(IMPLS), help="PAC implementations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, case, impl, size, kernel, repeats, threads = args.worker
        print(json.dumps(_worker(kind, case, impl, int(size), int(kernel), int(repeats), int(threads))))
        return

    try:
        import kornia
    except ImportError:
        parser.exit(1, "kornia is not installed: pip install -c constraints.txt -r requirements-bench.txt\n")
    import torch

    def measure(case, impl):
        common = (case, impl, args.size, args.kernel, args.repeats, args.threads)
        return {**run_worker(__file__, ("time", *common)), **run_worker(__file__, ("memory", *common), memory=True)}

    print(f"torch {torch.__version__}, kornia {kornia.__version__}, float32, no grad, 1x3x{args.size}x{args.size} "
          f"image and guide, {args.kernel}x{args.kernel}, sigma_color {SIGMA_COLOR}; load average "
          f"{os.getloadavg()[0]:.2f}")
    header = f"{'case':<10}{'filter':<18}{'threads':>8}{'ms':>9}{'x kornia':>10}{'peak MB':>9}{'x':>7}{'max diff':>10}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        base = measure(case, "kornia")
        rows = [("kornia", base, None)]
        for impl in args.impls:
            diff = run_worker(__file__, ("diff", case, impl, args.size, args.kernel, 1, args.threads))
            rows.append((f"PacPool2d {impl}", measure(case, impl), diff.get("max_diff")))
        for name, r, diff in rows:
            if "error" in r:
                print(f"{case:<10}{name:<18} failed: {r['error']}")
                continue
            print(f"{case:<10}{name:<18}{r['threads']:>8}{r['seconds'] * 1e3:9.1f}"
                  f"{ratio(r['seconds'], base.get('seconds')):>10}{mb(r['peak_bytes']):>9}"
                  f"{ratio(r['peak_bytes'], base.get('peak_bytes')):>7}{'' if diff is None else f'{diff:10.1e}'}")


if __name__ == "__main__":
    main()
