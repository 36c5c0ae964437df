"""Forward+backward time and peak CUDA memory of the PAC layers per implementation, on one CUDA GPU.

    python bench/bench_gpu.py                        # writes bench/results_gpu.md and prints the table
    python bench/bench_gpu.py --repeats 5 --dtypes fp32 --no-models

Layers: batch 8, 32 -> 32 channels, 256 x 256 outputs, k = 5, a 3-channel guide that needs a gradient:
PacConv2d (padding 2) vs nn.Conv2d, PacConvTranspose2d (stride 2, 128^2 -> 256^2) vs nn.ConvTranspose2d,
PacPool2d (stride 1, padding 2, normalize_kernel) vs nn.AvgPool2d. Implementations (the layers'
``impl``): unfold, taps and triton (the fused kernels of pac_triton). Ratios are to the
matching torch layer in the same dtype. bf16 runs under torch.autocast. Models: one training step (forward,
loss, backward, Adam step) of PacJointUpsample x8 and of the FCN8s + PacCRF segmentation model, per
implementation, with ratios to the taps implementation. Times are medians of CUDA-event timings; peak is
the memory allocated during one step beyond what was allocated before it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pac  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("unfold", "taps", "triton")


def _pac_triton():
    """pac_triton when its kernels can run on this GPU, else None."""
    try:
        import pac_triton
    except ImportError:
        return None
    return pac_triton if pac_triton.is_available() and not pac_triton._INTERPRETED else None


def measure(step: Callable[[], None], repeats: int) -> Dict[str, float]:
    """Median milliseconds and peak extra MiB of ``step`` (which runs forward and backward)."""
    step()  # warm-up: cuDNN autotuning, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "mib": peak}


def _guarded(step: Callable[[], None], repeats: int) -> Optional[Dict[str, float]]:
    try:
        return measure(step, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


# ---------------------------------------------------------------- layers


def layer_cases(args):
    """(name, torch layer, pac layer, input shape, guide shape) of the three layers."""
    b, c, n, k = args.batch, args.channels, args.size, args.kernel
    pad = k // 2
    return [
        ("PacConv2d", nn.Conv2d(c, c, k, padding=pad), pac.PacConv2d(c, c, k, padding=pad),
         (b, c, n, n), (b, 3, n, n)),
        ("PacConvTranspose2d", nn.ConvTranspose2d(c, c, k, stride=2, padding=pad, output_padding=1),
         pac.PacConvTranspose2d(c, c, k, stride=2, padding=pad, output_padding=1),
         (b, c, n // 2, n // 2), (b, 3, n, n)),
        ("PacPool2d", nn.AvgPool2d(k, stride=1, padding=pad, count_include_pad=False),
         pac.PacPool2d(k, stride=1, padding=pad, normalize_kernel=True), (b, c, n, n), (b, 3, n, n)),
    ]


def layer_step(forward: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], None]:
    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = forward()
        out.backward(torch.ones_like(out))
    return step


def bench_layers(args, pt, rows: List[List[str]]) -> None:
    for name, torch_layer, pac_layer, x_shape, guide_shape in layer_cases(args):
        torch_layer, pac_layer = torch_layer.cuda(), pac_layer.cuda()
        x = torch.randn(x_shape, device="cuda", requires_grad=True)
        guide = torch.randn(guide_shape, device="cuda", requires_grad=True)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            base = _guarded(layer_step(lambda: torch_layer(x), dtype), args.repeats)
            rows.append([name, dtype_name, f"torch ({type(torch_layer).__name__})", *_cells(base, base)])
            for impl in IMPLS:
                if impl == "triton" and pt is None:
                    rows.append([name, dtype_name, impl, "n/a (triton missing)", "", "", ""])
                    continue
                pac_layer.impl = impl
                forward = lambda m=pac_layer: m(x, guide)  # noqa: E731
                rows.append([name, dtype_name, impl, *_cells(_guarded(layer_step(forward, dtype), args.repeats), base)])
        del x, guide
        torch.cuda.empty_cache()


def _cells(result: Optional[Dict[str, float]], base: Optional[Dict[str, float]]) -> List[str]:
    if result is None:
        return ["OOM", "", "", ""]
    ratio = (lambda a, b: f"{a / b:.2f}x") if base else (lambda a, b: "")
    return [f"{result['ms']:.2f}", ratio(result["ms"], base and base["ms"]),
            f"{result['mib']:.0f}", ratio(result["mib"], base and base["mib"])]


# ---------------------------------------------------------------- models


def set_impl(model: nn.Module, impl: str) -> bool:
    """Select ``impl`` in every PAC layer of ``model``."""
    for m in model.modules():
        if isinstance(m, (pac.PacConv2d, pac.PacConvTranspose2d, pac.PacPool2d)):
            m.impl = impl
    return True


def model_cases(args):
    from task_jointUpsampling.models import create_model as create_joint
    from task_semanticSegmentation.models import create_model as create_seg

    n = args.size

    def joint():
        model = create_joint("PacJointUpsample", 8, 1, 3)
        target, guide = torch.randn(args.batch, 1, n // 8, n // 8), torch.randn(args.batch, 3, n, n)
        gt = torch.randn(args.batch, 1, n, n)
        return model, (lambda m: F.mse_loss(m(target.cuda(), guide.cuda()), gt.cuda()))

    def crf():
        model = create_seg(args.crf_model, 21)
        images = torch.randn(args.crf_batch, 3, n, n)
        labels = torch.randint(0, 21, (args.crf_batch, n, n))
        return model, (lambda m: F.cross_entropy(m(images.cuda()), labels.cuda()))

    return [("PacJointUpsample x8", joint), (args.crf_model, crf)]


def bench_models(args, rows: List[List[str]]) -> None:
    for name, build in model_cases(args):
        torch.manual_seed(0)
        model, loss_fn = build()
        model = model.cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]

            def step():
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    loss = loss_fn(model)
                loss.backward()
                optimizer.step()

            results = {}
            for impl in IMPLS:
                results[impl] = _guarded(step, max(1, args.repeats // 2)) if set_impl(model, impl) else "n/a"
            base = results["taps"] if isinstance(results["taps"], dict) else None
            for impl, result in results.items():
                if result == "n/a":
                    rows.append([name, dtype_name, impl, "n/a (pac.py has no impl= switch)", "", "", ""])
                else:
                    rows.append([name, dtype_name, impl, *_cells(result, base)])
        del model, optimizer
        torch.cuda.empty_cache()


def markdown(rows: List[List[str]], header: List[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="output height and width")
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-models", action="store_true", help="skip the two training steps")
    parser.add_argument("--crf-model", default="fcn8s_crfi5p4d5641p4d5161")
    parser.add_argument("--crf-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results_gpu.md")
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes must be a comma-separated subset of {sorted(DTYPES)}, got {bad}")
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})", file=sys.stderr)
        return 2

    pt = _pac_triton()
    torch.backends.cudnn.benchmark = True
    rows: List[List[str]] = []
    bench_layers(args, pt, rows)
    table = markdown(rows, ["case", "dtype", "impl", "fwd+bwd ms", "time ratio", "peak MiB", "memory ratio"])
    text = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; batch {args.batch}, "
            f"{args.channels} -> {args.channels} channels, {args.size}^2 outputs, k={args.kernel}; ratios to the "
            f"matching torch layer.\n\n{table}\n")
    args.out.write_text(text)  # written now too, in case the model steps do not finish
    if not args.no_models:
        model_rows: List[List[str]] = []
        bench_models(args, model_rows)
        text += (f"\nTraining steps (batch {args.batch} joint x8, {args.crf_batch} for the CRF model, {args.size}^2):"
                 "\n\n" + markdown(model_rows, ["model (one training step)", "dtype", "impl", "step ms",
                                                "time / taps", "peak MiB", "memory / taps"]) + "\n")
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
