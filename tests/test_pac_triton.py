"""pac_triton.pacconv2d_gaussian (fused Triton kernel) against pac.packernel2d + pac.pacconv2d.

The kernel runs on CPU tensors through the Triton interpreter (no GPU here), so sizes stay tiny.
Every test is skipped when triton is not installed (CI does not install the extra):

    pip install -r requirements-triton.txt && python -m pytest -m triton tests/test_pac_triton.py
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton and pac_triton are imported: kernels decorate at import

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import pac  # noqa: E402
import pac_triton  # noqa: E402
from pac_triton import pacconv2d_gaussian  # noqa: E402

pytestmark = pytest.mark.triton
REPO_ROOT = Path(__file__).resolve().parent.parent


def make_inputs(batch=2, channels=3, guide_channels=3, out_channels=5, size=(6, 7), kernel=(3, 3),
                bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=gen).to(dtype)
    guide = torch.randn(batch, guide_channels, *size, generator=gen).to(dtype)
    weight = torch.randn(out_channels, channels, *kernel, generator=gen).to(dtype)
    b = torch.randn(out_channels, generator=gen) if bias else None
    return x, guide, weight, b


def reference(x, guide, weight, bias, stride, padding, dilation, normalize_kernel, native_impl):
    """pac.packernel2d + pac.pacconv2d in float64 on the very same (possibly rounded) values."""
    kernel, _ = pac.packernel2d(guide.double(), kernel_size=tuple(weight.shape[2:]), stride=stride,
                                padding=padding, dilation=dilation, normalize_kernel=normalize_kernel,
                                native_impl=native_impl)
    return pac.pacconv2d(x.double(), kernel, weight.double(), None if bias is None else bias.double(),
                         stride, padding, dilation, native_impl=native_impl)


def assert_matches_pac(x, guide, weight, bias, stride=1, padding=0, dilation=1, normalize_kernel=False, tol=1e-6):
    """Runs the fused kernel and checks it against both implementations of pac.py, relative to the
    output's magnitude."""
    with torch.no_grad():
        out = pacconv2d_gaussian(x, guide, weight, bias, stride, padding, dilation, normalize_kernel)
    for native_impl in (True, False):
        ref = reference(x, guide, weight, bias, stride, padding, dilation, normalize_kernel, native_impl)
        assert out.shape == ref.shape and out.dtype == x.dtype
        err = (out.double() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        assert err <= tol * scale, f"native_impl={native_impl}: max error {err:.3g} > {tol:g} * {scale:.3g}"
    return out


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    (3, 1, 1, 1, (6, 7)),
    (3, 2, 1, 1, (7, 8)),
    (5, 1, 2, 1, (9, 10)),                   # 90 output pixels: more than one pixel block of 64
    (3, 1, 2, 2, (7, 6)),
    ((3, 5), (2, 1), (0, 2), (1, 2), (7, 9)),  # rectangular kernel, per-axis geometry
    (1, 1, 0, 1, (5, 5)),
    (3, 1, 3, 1, (5, 5)),                    # border windows without any real pixel
], ids=["k3", "stride2", "k5-multiblock", "dilation2", "rect-pairs", "k1", "pad-beyond-window"])
@pytest.mark.parametrize("normalize_kernel", [False, True], ids=["plain", "normalized"])
def test_geometry_matches_pac(kernel, stride, padding, dilation, size, normalize_kernel):
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x, guide, weight, bias = make_inputs(size=size, kernel=k)
    assert_matches_pac(x, guide, weight, bias, stride, padding, dilation, normalize_kernel)


@pytest.mark.parametrize("channels, guide_channels, out_channels", [
    (1, 1, 1),
    (3, 3, 5),
    (40, 2, 70),    # two input-channel blocks (32) and two output-channel blocks (64), both partial
    (17, 20, 17),   # two guide-channel blocks (16)
])
@pytest.mark.parametrize("bias, normalize_kernel", [(True, False), (False, True)], ids=["bias", "nobias-normalized"])
def test_channel_counts_match_pac(channels, guide_channels, out_channels, bias, normalize_kernel):
    x, guide, weight, b = make_inputs(batch=1, channels=channels, guide_channels=guide_channels,
                                      out_channels=out_channels, size=(5, 6), bias=bias)
    assert_matches_pac(x, guide, weight, b, padding=1, normalize_kernel=normalize_kernel)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)], ids=["fp16", "bf16"])
def test_low_precision_inputs(dtype, tol):
    # The reference sees the same rounded values; the rest is the kernel's low-precision products and
    # output rounding (float32 accumulation keeps it at a few units of the output's last place).
    x, guide, weight, bias = make_inputs(channels=8, out_channels=6, dtype=dtype)
    assert_matches_pac(x, guide, weight, bias, padding=1, normalize_kernel=True, tol=tol)


def test_guide_dtype_independent_of_input_dtype():
    x, guide, weight, bias = make_inputs()
    assert_matches_pac(x, guide.half(), weight, bias, padding=1)


def test_strided_inputs_give_the_contiguous_result():
    x, guide, weight, bias = make_inputs(channels=4, guide_channels=3, out_channels=4, size=(6, 8))
    with torch.no_grad():
        expected = pacconv2d_gaussian(x, guide, weight, bias, padding=1)
        strided_guide = torch.stack([guide, -guide], dim=-1)[..., 0]  # non-contiguous view, same values
        out = pacconv2d_gaussian(x.to(memory_format=torch.channels_last), strided_guide,
                                 weight.transpose(0, 1).contiguous().transpose(0, 1), bias, padding=1)
    assert not strided_guide.is_contiguous() and torch.equal(strided_guide, guide)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_equals_pac_conv2d_module_in_inference():
    torch.manual_seed(0)
    conv = pac.PacConv2d(4, 6, kernel_size=3, padding=2, dilation=2)
    x, guide = torch.randn(1, 4, 7, 7), torch.randn(1, 3, 7, 7)
    with torch.inference_mode():
        expected = conv(x, guide)
        out = pacconv2d_gaussian(x, guide, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    x, guide, weight, bias = make_inputs(batch=0)
    with torch.no_grad():
        assert pacconv2d_gaussian(x, guide, weight, bias, padding=1).shape == (0, 5, 6, 7)


# ---------------------------------------------------------------- errors


def test_gradient_request_raises():
    x, guide, weight, bias = make_inputs()
    weight.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        pacconv2d_gaussian(x, guide, weight, bias, padding=1)


def _bad(**changes):
    x, guide, weight, bias = make_inputs()
    args = dict(input=x, guide=guide, weight=weight, bias=bias, stride=1, padding=1, dilation=1,
                normalize_kernel=False)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(input=[[1.0]]), "input must be a torch.Tensor"),
    (_bad(input=torch.randn(3, 6, 7)), "input must be 4-D"),
    (_bad(guide=torch.randn(1, 3, 6, 7)), "guide must have the input's batch and size"),
    (_bad(guide=torch.randn(2, 3, 6, 6)), "guide must have the input's batch and size"),
    (_bad(weight=torch.randn(5, 4, 3, 3)), "weight must have shape"),
    (_bad(weight=torch.randn(5, 3, 2, 3)), "weight must have an odd kernel size"),
    (_bad(weight=torch.randn(5, 3, 3)), "weight must be 4-D"),
    (_bad(bias=torch.randn(4)), "bias must be None or a tensor of shape"),
    (_bad(input=torch.randn(2, 3, 6, 7, dtype=torch.float64)), "input must be float32, float16 or bfloat16"),
    (_bad(guide=torch.ones(2, 3, 6, 7, dtype=torch.int64)), "guide must be float32, float16 or bfloat16"),
    (_bad(weight=torch.randn(5, 3, 3, 3).half()), "weight must have the input's dtype"),
    (_bad(stride=0), "stride must be >= 1"),
    (_bad(dilation=(1, 0)), "dilation must be >= 1"),
    (_bad(padding=-1), "padding must be >= 0"),
    (_bad(padding=1.5), "padding must be an int or a pair of ints"),
    (_bad(stride=(1, 1, 1)), "stride must be an int or a pair of ints"),
    (_bad(normalize_kernel=None), "normalize_kernel must be a bool"),
    (_bad(weight=torch.randn(5, 3, 9, 9), padding=0), "input of size .* is too small"),
    (_bad(input=torch.randn(2, 3, 6, 7, device="meta")), "must be on the input's device"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match), torch.no_grad():
        pacconv2d_gaussian(**args)


# ---------------------------------------------------------------- availability


def test_is_available_under_interpreter():
    assert pac_triton.is_available() is True


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_without_triton_and_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, pac_triton
        assert pac_triton.is_available() is False
        try:
            pac_triton.pacconv2d_gaussian(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
        except RuntimeError as e:
            assert "requirements-triton.txt" in str(e), e
        else:
            raise SystemExit("no error without triton")
        """, env)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compiles_for_cuda_tensor_cores(tmp_path):
    """Ahead-of-time compilation for an sm_80 GPU, no GPU needed: the real compiler accepts the kernel
    (the interpreter is more lenient) and the float16 path uses tensor cores (MMA)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))  # a real compile, not a cache hit
    result = _run_python("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import pac_triton
        fn = pac_triton._pac_gaussian_forward_kernel
        consts = dict(KH=3, KW=3, HAS_BIAS=True, NORMALIZE=True, DOT_DTYPE=tl.float16, DOT_PRECISION=None,
                      BLOCK_P=64, BLOCK_O=64, BLOCK_C=32, BLOCK_G=4)
        signature = {n: "*fp16" if n.endswith("_ptr") else "constexpr" if n in consts else "i32"
                     for n in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in consts.items()}),
                                  target=GPUTarget("cuda", 80, 32))
        assert len(compiled.asm["cubin"]) > 0
        assert "nvidia_mma" in compiled.asm["ttgir"], "no tensor-core MMA in the float16 kernel"
        print("ok")
        """, env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
