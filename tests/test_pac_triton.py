"""pac_triton (fused Triton kernels, forward and backward) against the brute-force reference.

The kernels run on CPU tensors through the Triton interpreter (no GPU here), so sizes stay tiny. Every
output and every gradient (input, guide, weight, bias) is compared with the float64 brute-force
reference of tests/pac_reference.py, differentiated by autograd; the weight gradient is compared tap by
tap, and every tap's reference gradient is checked to be non-zero, so a kernel that skips or misplaces
taps fails. Every test is skipped when triton is not installed (CI does not install the extra):

    pip install -r requirements-triton.txt && python -m pytest -m triton tests/test_pac_triton.py

With ``PAC_TRITON_TEST_DEVICE=cuda`` the same numeric cases run the compiled kernels on a CUDA GPU (the
reference stays on the CPU) and the interpreter-specific tests are skipped (bench/gpu_check.sh does this).
"""
import os
import sys

DEVICE = os.environ.get("PAC_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and pac_triton are imported: kernels decorate at import

import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if DEVICE == "cpu" and "pac_triton" in sys.modules and not sys.modules["pac_triton"]._INTERPRETED:
    pytest.skip("pac_triton was imported without TRITON_INTERPRET=1: run this file on its own",
                allow_module_level=True)
if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip(f"PAC_TRITON_TEST_DEVICE={DEVICE} but there is no CUDA device", allow_module_level=True)

import pac  # noqa: E402
import pac_reference as ref  # noqa: E402
import pac_triton  # noqa: E402

pytestmark = pytest.mark.triton
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter run on CPU tensors")
REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


# ---------------------------------------------------------------- a case: inputs, fused run, reference run


def make_case(layer, size, kernel, stride=1, padding=0, output_padding=0, dilation=1, groups=1, channels=3,
              out_channels=4, guide_channels=2, batch=1, normalize=False, mask=None, dtype=torch.float32, seed=0):
    """Inputs of one layer call, rounded to ``dtype``. ``mask``: None, 'batch' (B, 1, H, W) or 'shared'
    (1, 1, H, W), with about a third of the pixels off."""
    k, s, p, op, d = map(ref.pair, (kernel, stride, padding, output_padding, dilation))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=gen).to(dtype)
    if layer == "conv_transpose":
        guide_hw = tuple(ref.conv_transpose_out_size(n, *a) for n, a in zip(size, zip(k, s, p, op, d)))
        weight = torch.randn(channels, out_channels, *k, generator=gen).to(dtype)
    else:
        guide_hw = size
        weight = torch.randn(out_channels, channels // groups, *k, generator=gen).to(dtype) if layer == "conv" else None
    guide = torch.randn(batch, guide_channels, *guide_hw, generator=gen).to(dtype)
    bias = torch.randn(out_channels, generator=gen) if layer != "pool" else None
    m = None
    if mask is not None:
        m = (torch.rand(batch if mask == "batch" else 1, 1, *size, generator=gen) > 0.35).float()
    return dict(layer=layer, x=x, guide=guide, weight=weight, bias=bias, mask=m, k=k, s=s, p=p, op=op, d=d,
                groups=groups, normalize=normalize)


def leaves(case):
    return {n: case[n] for n in ("x", "guide", "weight", "bias") if case[n] is not None}


def fused(case, tensors):
    c = dict(case, mask=None if case["mask"] is None else case["mask"].to(tensors["x"].device))
    if c["layer"] == "conv":
        return pac_triton.pac_conv2d(tensors["x"], tensors["guide"], tensors["weight"], tensors["bias"], c["s"], c["p"],
                                     c["d"], c["groups"], c["normalize"], c["mask"])
    if c["layer"] == "conv_transpose":
        return pac_triton.pac_conv_transpose2d(tensors["x"], tensors["guide"], tensors["weight"], tensors["bias"],
                                               c["s"], c["p"], c["op"], c["d"], c["normalize"], c["mask"])
    return pac_triton.pac_pool2d(tensors["x"], tensors["guide"], c["k"], c["s"], c["p"], c["d"], c["normalize"],
                                 c["mask"])


def brute_force(case, tensors):
    """The brute-force reference in float64: (output, output mask or None)."""
    c = case
    mask = c["mask"]
    if mask is not None:
        mask = mask.double().expand(c["x"].shape[0], -1, -1, -1)
    kernel, out_mask = ref.ref_kernel(tensors["guide"], c["k"], c["s"], c["p"], c["d"], normalize_kernel=c["normalize"],
                                      transposed=c["layer"] == "conv_transpose", output_padding=c["op"], mask=mask)
    if c["layer"] == "conv":
        out = ref.ref_pacconv2d(tensors["x"], kernel, tensors["weight"], tensors["bias"], c["s"], c["p"], c["d"],
                                groups=c["groups"])
    elif c["layer"] == "conv_transpose":
        out = ref.ref_pacconv_transpose2d(tensors["x"], kernel, tensors["weight"], tensors["bias"], c["s"], c["p"],
                                          c["op"], c["d"])
    else:
        out = ref.ref_pacpool2d(tensors["x"], kernel, c["k"], c["s"], c["p"], c["d"])
    return out, out_mask


def assert_close_scaled(name, got, expected, tol):
    """Max error relative to the reference's magnitude (at least 1)."""
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = (got.cpu().double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def check_case(case, tol=None):
    """Fused output and every gradient against the brute-force reference on the same rounded values."""
    tol = tol or max(TOLERANCE[t.dtype] for t in leaves(case).values() if t.dtype in TOLERANCE)
    ours = {n: t.to(DEVICE).clone().requires_grad_() for n, t in leaves(case).items()}
    theirs = {n: t.detach().double().requires_grad_() for n, t in leaves(case).items()}
    result = fused(case, ours)
    out, out_mask = result if case["mask"] is not None else (result, None)
    expected, expected_mask = brute_force(case, theirs)
    assert out.dtype == case["x"].dtype
    assert_close_scaled("output", out, expected, tol)
    if case["mask"] is not None:
        assert out_mask.dtype == torch.float32
        assert torch.equal(out_mask.cpu().double(), expected_mask[:out_mask.shape[0]]), "output mask"

    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = list(ours)
    got = torch.autograd.grad(out, [ours[n] for n in names], grad_out.to(out))
    want = torch.autograd.grad(expected, [theirs[n] for n in names], grad_out)
    for name, g, w in zip(names, got, want):
        assert g.dtype == ours[name].dtype, f"grad of {name}: dtype {g.dtype}"
        assert_close_scaled(f"grad of {name}", g, w, tol)
    if "weight" in ours:  # tap by tap: every tap has a gradient, and the right one
        g_w, w_w = got[names.index("weight")], want[names.index("weight")]
        for i in range(w_w.shape[2]):
            for j in range(w_w.shape[3]):
                assert w_w[:, :, i, j].abs().max() > 0, f"reference weight gradient of tap {(i, j)} is zero"
                assert_close_scaled(f"grad of weight, tap {(i, j)}", g_w[:, :, i, j], w_w[:, :, i, j], tol)
    return out


# ---------------------------------------------------------------- numerics, float32


CONV_CASES = {
    "k3-batch2": dict(size=(6, 7), kernel=3, padding=1, batch=2),
    "k3-stride2-normalized": dict(size=(7, 8), kernel=3, stride=2, padding=1, normalize=True),
    "k5": dict(size=(6, 5), kernel=5, padding=2),
    "dilation2-normalized": dict(size=(7, 6), kernel=3, padding=2, dilation=2, normalize=True),
    "rect-pairs": dict(size=(7, 9), kernel=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    "groups2-stride2": dict(size=(7, 5), kernel=3, stride=2, padding=1, groups=2, channels=4, out_channels=6,
                            batch=2),
    "depthwise": dict(size=(5, 6), kernel=3, padding=1, groups=3, channels=3, out_channels=3, normalize=True),
    "pad-beyond-window": dict(size=(5, 5), kernel=3, padding=3, normalize=True),  # windows without real pixels
    "mask": dict(size=(5, 4), kernel=5, padding=1, mask="batch", batch=2),
    "mask-shared-normalized": dict(size=(6, 5), kernel=3, padding=1, stride=2, mask="shared", normalize=True,
                                   batch=2),
    "many-channels": dict(size=(4, 5), kernel=3, padding=1, batch=1, channels=40, out_channels=70,
                          guide_channels=20),  # several blocks of input, output and guide channels
    "many-pixels": dict(size=(23, 25), kernel=3, padding=1, channels=2, out_channels=2),  # > 2 pixel blocks
}

TRANSPOSED_CASES = {
    "k3-stride2-batch2": dict(size=(4, 5), kernel=3, stride=2, padding=1, output_padding=1, batch=2),
    "k5-stride2-normalized": dict(size=(3, 3), kernel=5, stride=2, padding=2, output_padding=1, normalize=True),
    "k3-stride1-dilation2-mask-normalized": dict(size=(5, 4), kernel=3, padding=1, dilation=2, mask="batch",
                                                 normalize=True),
    "k3-stride3-mask": dict(size=(3, 4), kernel=3, stride=3, output_padding=2, mask="shared", batch=2),
    "rect-pairs": dict(size=(4, 3), kernel=(3, 5), stride=(2, 1), padding=(1, 2), output_padding=(1, 0),
                       dilation=(1, 2), out_channels=5),
    "k3-stride4-normalized": dict(size=(2, 3), kernel=3, stride=4, padding=1, output_padding=3, normalize=True),
}

POOL_CASES = {
    "k3": dict(size=(6, 7), kernel=3, padding=1),
    "k5-stride2-normalized": dict(size=(8, 7), kernel=5, stride=2, padding=2, normalize=True),
    "k3-dilation2-stride2-mask": dict(size=(8, 7), kernel=3, stride=2, padding=1, dilation=2, mask="batch"),
    "rect-pairs-normalized": dict(size=(6, 9), kernel=(3, 5), stride=(1, 2), padding=(1, 0), normalize=True),
}


@pytest.mark.parametrize("params", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_matches_reference(params):
    check_case(make_case("conv", **params))


@pytest.mark.parametrize("params", TRANSPOSED_CASES.values(), ids=TRANSPOSED_CASES.keys())
def test_conv_transpose_matches_reference(params):
    check_case(make_case("conv_transpose", **params))


@pytest.mark.parametrize("params", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_pool_matches_reference(params):
    check_case(make_case("pool", **params))



@pytest.mark.parametrize("layer, params", [
    ("conv_transpose", dict(size=(4, 5), kernel=5, stride=2, padding=2, output_padding=1)),
    ("conv", dict(size=(7, 6), kernel=5, stride=2, padding=2, mask="batch")),
    ("pool", dict(size=(7, 6), kernel=5, stride=2, padding=2, mask="batch")),
], ids=["conv_transpose", "conv_masked", "pool_masked"])
def test_normalised_kernel_of_far_apart_features(layer, params):
    """Guide features 20 apart: exp(-D / 2) underflows in float32 on every valid tap of some windows (a transposed
    layer's windows between input pixels, windows whose centre is masked). The online shift keeps those kernels
    normalised and every gradient finite and right (as pac's test_normalised_kernel_of_far_apart_features_in_float32)."""
    case = make_case(layer, guide_channels=3, batch=2, normalize=True, **params)
    gen = torch.Generator().manual_seed(2)
    shape = case["guide"].shape
    case["guide"] = 20 * torch.randint(0, 2, shape, generator=gen).float() + torch.rand(shape, generator=gen)
    if case["mask"] is not None:
        case["mask"] = (torch.rand(case["mask"].shape, generator=gen) > 0.7).float()
    naive32, _ = ref.ref_kernel(case["guide"], case["k"], case["s"], case["p"], case["d"], normalize_kernel=True,
                                transposed=layer == "conv_transpose", output_padding=case["op"], mask=case["mask"])
    assert (naive32.sum((2, 3)) == 0).any(), "the case must underflow in float32 when computed naively"
    check_case(case, tol=1e-3)


# ---------------------------------------------------------------- numerics, float16 and bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layer, params", [
    ("conv", dict(size=(6, 7), kernel=3, padding=1, stride=2, normalize=True, channels=8, out_channels=6)),
    ("conv_transpose", dict(size=(4, 5), kernel=3, stride=2, padding=1, output_padding=1, mask="batch")),
    ("pool", dict(size=(6, 7), kernel=3, padding=1, normalize=True)),
], ids=["conv", "conv_transpose", "pool"])
def test_low_precision_matches_reference(layer, params, dtype):
    # The reference sees the same rounded values; the rest is the kernels' low-precision products and the
    # rounding of outputs and gradients (float32 accumulation keeps it at a few units of the last place).
    check_case(make_case(layer, dtype=dtype, **params))


def test_guide_dtype_independent_of_input_dtype():
    case = make_case("conv", size=(5, 6), kernel=3, padding=1, normalize=True)
    case["guide"] = case["guide"].half()
    check_case(case)


# ---------------------------------------------------------------- the layers' semantics


@interpreter_only
@pytest.mark.parametrize("native_impl", [False, True])
def test_equals_the_pac_modules(native_impl):
    """Same numbers as the modules of pac.py (both implementations), outputs and parameter gradients."""
    torch.manual_seed(0)
    x, guide, up_guide = torch.randn(1, 4, 5, 4), torch.randn(1, 3, 5, 4), torch.randn(1, 3, 10, 8)
    mask = (torch.rand(1, 1, 5, 4) > 0.3).float()
    conv = pac.PacConv2d(4, 6, 3, padding=1, normalize_kernel=True, native_impl=native_impl)
    up = pac.PacConvTranspose2d(4, 2, 5, stride=2, padding=2, output_padding=1, native_impl=native_impl)
    pool = pac.PacPool2d(3, stride=2, padding=1, native_impl=native_impl)
    pairs = [
        (conv(x, guide, mask=mask), pac_triton.pac_conv2d(x, guide, conv.weight, conv.bias, 1, 1, 1, 1, True, mask)),
        (up(x, up_guide), pac_triton.pac_conv_transpose2d(x, up_guide, up.weight, up.bias, 2, 2, 1, 1, False)),
        (pool(x, guide), pac_triton.pac_pool2d(x, guide, 3, 2, 1, 1, False)),
    ]
    for expected, got in pairs:
        expected, got = (expected, got) if isinstance(got, tuple) else ((expected,), (got,))
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    for module in (conv, up):
        params = [module.weight, module.bias]
        out_pac = (conv(x, guide, mask=mask)[0] if module is conv else up(x, up_guide))
        out_fused = (pac_triton.pac_conv2d(x, guide, conv.weight, conv.bias, 1, 1, 1, 1, True, mask)[0]
                     if module is conv else
                     pac_triton.pac_conv_transpose2d(x, up_guide, up.weight, up.bias, 2, 2, 1, 1, False))
        for a, b in zip(torch.autograd.grad(out_pac.square().sum(), params),
                        torch.autograd.grad(out_fused.square().sum(), params)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@interpreter_only
def test_modules_select_the_fused_kernels_with_impl_triton(monkeypatch):
    """impl='triton' runs pac_triton's kernels (and equals 'taps'); options it does not support are refused;
    impl='auto' keeps CPU tensors on 'taps' even under the interpreter."""
    torch.manual_seed(0)
    x, guide, mask = torch.randn(1, 4, 6, 5), torch.randn(1, 3, 6, 5), (torch.rand(1, 1, 6, 5) > 0.3).float()
    calls = []
    original = pac_triton.pac_conv2d
    monkeypatch.setattr(pac_triton, "pac_conv2d", lambda *a, **k: calls.append("conv") or original(*a, **k))
    conv = pac.PacConv2d(4, 3, 3, padding=1, normalize_kernel=True, impl="triton")
    fused = conv(x, guide, mask=mask)
    assert calls == ["conv"]
    conv.impl = "taps"
    for got, expected in zip(fused, conv(x, guide, mask=mask)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    conv.impl = "auto"
    conv(x, guide)
    assert calls == ["conv"]
    with pytest.raises(ValueError, match="impl='triton'"):
        pac.PacConv2d(4, 3, 3, padding=1, kernel_type="inv_1_-1", impl="triton")(x, guide)


@interpreter_only
def test_each_gradient_alone_equals_the_joint_one():
    """The backward computes only the gradients asked for, and each alone is the one computed jointly."""
    case = make_case("conv", size=(5, 6), kernel=3, padding=1, normalize=True)
    tensors = {n: t.clone().requires_grad_() for n, t in leaves(case).items()}
    joint = dict(zip(tensors, torch.autograd.grad(fused(case, tensors).sum(), list(tensors.values()))))
    for name in tensors:
        alone = {n: t.clone().requires_grad_(n == name) for n, t in leaves(case).items()}
        (grad,) = torch.autograd.grad(fused(case, alone).sum(), [alone[name]])
        assert torch.equal(grad, joint[name]), name


@interpreter_only
def test_strided_inputs_give_the_contiguous_result():
    case = make_case("conv", size=(6, 8), kernel=3, padding=1, channels=4, out_channels=4)
    x, guide, weight, bias = case["x"], case["guide"], case["weight"], case["bias"]
    with torch.no_grad():
        expected = pac_triton.pac_conv2d(x, guide, weight, bias, padding=1)
        strided_guide = torch.stack([guide, -guide], dim=-1)[..., 0]  # non-contiguous view, same values
        out = pac_triton.pac_conv2d(x.to(memory_format=torch.channels_last), strided_guide,
                                    weight.transpose(0, 1).contiguous().transpose(0, 1), bias, padding=1)
    assert not strided_guide.is_contiguous() and torch.equal(strided_guide, guide)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@interpreter_only
def test_autocast_runs_in_the_autocast_dtype():
    case = make_case("conv", size=(5, 6), kernel=3, padding=1, normalize=True)
    weight = case["weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pac_triton.pac_conv2d(case["x"], case["guide"], weight, case["bias"], padding=1, normalize_kernel=True)
    assert out.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(out.float().sum(), [weight])
    assert g.dtype == torch.float32
    rounded = dict(case, x=case["x"].bfloat16().float(), weight=case["weight"].bfloat16().float())
    expected, _ = brute_force(rounded, {n: t.double() for n, t in leaves(rounded).items()})
    assert_close_scaled("output", out, expected, TOLERANCE[torch.bfloat16])


@interpreter_only
def test_torch_compile_keeps_the_ops_in_one_graph():
    case = make_case("conv_transpose", size=(3, 4), kernel=3, stride=2, padding=1, output_padding=1)
    x, guide, weight = case["x"], case["guide"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
    fn = torch.compile(pac_triton.pac_conv_transpose2d, backend="aot_eager", fullgraph=True)
    out = fn(x, guide, weight, case["bias"], 2, 1, 1)
    eager = pac_triton.pac_conv_transpose2d(x, guide, weight, case["bias"], 2, 1, 1)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), [guide, weight])
    for g, e in zip(grads, torch.autograd.grad(eager.sum(), [guide, weight])):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@interpreter_only
def test_registered_ops_pass_opcheck():
    case = make_case("conv", size=(4, 4), kernel=3, padding=1, batch=1, mask="shared", normalize=True)
    geometry = [3, 3, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    args = (case["x"].requires_grad_(), case["guide"].requires_grad_(), case["weight"].requires_grad_(),
            case["bias"].requires_grad_(), case["mask"], geometry, 1, True)
    torch.library.opcheck(torch.ops.pac_triton.pac_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@interpreter_only
def test_outputs_are_deterministic():
    case = make_case("conv", size=(9, 9), kernel=3, padding=1, batch=2)
    tensors = {n: t.clone().requires_grad_() for n, t in leaves(case).items()}
    runs = []
    for _ in range(2):
        out = fused(case, tensors)
        runs.append([out] + list(torch.autograd.grad(out.sum(), list(tensors.values()))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@interpreter_only
def test_empty_batch():
    case = make_case("conv", size=(6, 7), kernel=3, padding=1, batch=0)
    tensors = {n: t.clone().requires_grad_() for n, t in leaves(case).items()}
    out = fused(case, tensors)
    assert out.shape == (0, 4, 6, 7)
    grads = torch.autograd.grad(out.sum(), list(tensors.values()))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in tensors.values()]
    assert grads[2].abs().sum() == 0


# ---------------------------------------------------------------- supports()


def _supports(**changes):
    x, guide = torch.randn(1, 3, 5, 5), torch.randn(1, 2, 5, 5)
    args = dict(layer="conv", x=x, guide=guide, kernel_type="gaussian", smooth_kernel_type="none",
                normalize_kernel=False, channel_wise=False, shared_filters=False, groups=1, padding_mode="zeros",
                mask=None, stride=1, padding=1, dilation=1, output_padding=0)
    args.update(changes)
    layer, x, guide = args.pop("layer"), args.pop("x"), args.pop("guide")
    return pac_triton.supports(layer, x, guide, **args)


@interpreter_only
def test_supports_the_fused_options():
    for layer in ("conv", "conv_transpose", "pool"):
        assert _supports(layer=layer)
        assert _supports(layer=layer, normalize_kernel=True, mask=torch.ones(1, 1, 5, 5))
    assert _supports(groups=3)
    assert _supports(x=torch.randn(1, 3, 5, 5).half(), guide=torch.randn(1, 2, 5, 5).bfloat16())


@interpreter_only
@pytest.mark.parametrize("changes", [
    dict(kernel_type="inv_0.5_-2"), dict(smooth_kernel_type="gaussian"), dict(channel_wise=True),
    dict(shared_filters=True), dict(padding_mode="reflect"), dict(layer="pool", groups=3),
    dict(layer="deconv"), dict(x=torch.randn(1, 3, 5, 5).double()), dict(guide=torch.randn(1, 2, 5, 5).double()),
    dict(mask=torch.ones(1, 1, 5, 5, requires_grad=True)), dict(x=torch.randn(1, 3, 5, 5, device="meta")),
], ids=lambda c: ",".join(f"{k}={v if not isinstance(v, torch.Tensor) else v.dtype}" for k, v in c.items()))
def test_supports_refuses_other_options(changes):
    assert not _supports(**changes)


@interpreter_only
def test_supports_counts_the_autocast_dtype():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _supports(x=torch.randn(1, 3, 5, 5).double())  # autocast computes in bfloat16


# ---------------------------------------------------------------- errors


def _conv_args(**changes):
    case = make_case("conv", size=(6, 7), kernel=3, batch=2)
    args = dict(x=case["x"], guide=case["guide"], weight=case["weight"], bias=case["bias"], stride=1, padding=1,
                dilation=1, groups=1, normalize_kernel=False)
    args.update(changes)
    return args


@interpreter_only
@pytest.mark.parametrize("args, match", [
    (_conv_args(x=[[1.0]]), "input must be a torch.Tensor"),
    (_conv_args(x=torch.randn(3, 6, 7)), "input must be 4-D"),
    (_conv_args(guide=torch.randn(1, 2, 6, 7)), "guide must have shape"),
    (_conv_args(guide=torch.randn(2, 2, 6, 6)), "guide must have shape"),
    (_conv_args(weight=torch.randn(4, 4, 3, 3)), "weight must have shape"),
    (_conv_args(weight=torch.randn(4, 3, 2, 3)), "kernel_size must be odd"),
    (_conv_args(weight=torch.randn(4, 3, 3)), "weight must be 4-D"),
    (_conv_args(bias=torch.randn(5)), "bias must be None or a tensor of shape"),
    (_conv_args(groups=2), "groups must be a positive integer dividing"),
    (_conv_args(x=torch.randn(2, 3, 6, 7, dtype=torch.float64)), "input must be float32, float16 or bfloat16"),
    (_conv_args(guide=torch.ones(2, 2, 6, 7, dtype=torch.int64)), "guide must be float32, float16 or bfloat16"),
    (_conv_args(stride=0), "stride must be >= 1"),
    (_conv_args(dilation=(1, 0)), "dilation must be >= 1"),
    (_conv_args(padding=-1), "padding must be >= 0"),
    (_conv_args(padding=1.5), "padding must be an int or a pair of ints"),
    (_conv_args(normalize_kernel=None), "normalize_kernel must be a bool"),
    (_conv_args(padding=0, weight=torch.randn(4, 3, 9, 9)), "input of size .* is too small"),
    (_conv_args(mask=torch.ones(2, 1, 6, 6)), "mask must have shape"),
    (_conv_args(mask=torch.ones(2, 1, 6, 7, requires_grad=True)), "mask must not require a gradient"),
    (_conv_args(x=torch.randn(2, 3, 6, 7, device="meta")), "input must be a CUDA tensor"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pac_triton.pac_conv2d(**args)


@interpreter_only
def test_transposed_guide_must_have_the_output_size():
    case = make_case("conv_transpose", size=(3, 4), kernel=3, stride=2, padding=1, output_padding=1, batch=2)
    with pytest.raises(ValueError, match=r"guide must have shape \(2, \*, 6, 8\)"):
        pac_triton.pac_conv_transpose2d(case["x"], case["guide"][:, :, :5], case["weight"], None, 2, 1, 1)


# ---------------------------------------------------------------- availability


@interpreter_only
def test_is_available_under_interpreter():
    assert pac_triton.is_available() is True


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@interpreter_only
def test_import_without_triton_and_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, pac_triton
        assert pac_triton.is_available() is False
        assert pac_triton.supports("conv", torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)) is False
        try:
            pac_triton.pac_conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
        except RuntimeError as e:
            assert "requirements-triton.txt" in str(e), e
        else:
            raise SystemExit("no error without triton")
        """, env)
    assert result.returncode == 0, result.stderr


@interpreter_only
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PAC_TRITON_AOT") != "1",
                    reason="set PAC_TRITON_AOT=1: compiles every kernel for sm_80, several CPU minutes")
def test_compiles_for_cuda_tensor_cores(tmp_path):
    """Ahead-of-time compilation of every kernel for an sm_80 GPU, no GPU needed: the real compiler
    accepts them (the interpreter is more lenient) and the float16 matmuls use tensor cores (MMA)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path))  # a real compile, not a cache hit
    result = _run_python("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import pac_triton as pt

        FLOAT32_POINTERS = ("norm_ptr", "dist_grad_ptr", "partial_ptr", "bias_ptr", "mask_ptr")

        def compile_for_sm80(fn, consts):
            signature = {n: "constexpr" if n in consts else ("*fp32" if n in FLOAT32_POINTERS else "*fp16")
                         if n.endswith("_ptr") else "i32" for n in fn.arg_names}
            source = ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in consts.items()})
            return triton.compile(source, target=GPUTarget("cuda", 80, 32)).asm["ttgir"]

        base = dict(KH=5, KW=5, DOT_DTYPE=tl.float16, DOT_PRECISION=None, BLOCK_G=4)
        blocks = dict(BLOCK_O=64, BLOCK_C=32)
        for pool, normalize, mask in ((False, True, True), (False, False, False), (True, True, False)):
            flags = dict(base, POOL=pool, HAS_MASK=mask, **blocks)
            ir = compile_for_sm80(pt._forward_kernel, dict(flags, HAS_BIAS=True, NORMALIZE=normalize, BLOCK_P=64))
            assert pool or "nvidia_mma" in ir, "no tensor-core MMA in the float16 forward"
            compile_for_sm80(pt._kernel_grad_kernel, dict(flags, NORMALIZE=normalize, USE_NORM=normalize or mask,
                                                          BLOCK_P=64, BLOCK_T=32))
            compile_for_sm80(pt._input_grad_kernel, dict(flags, NORMALIZE=normalize, USE_NORM=normalize or mask,
                                                         BLOCK_Q=64))
        compile_for_sm80(pt._guide_grad_kernel, dict(KH=5, KW=5, BLOCK_Q=64, BLOCK_G=4))
        for normalize in (True, False):
            ir = compile_for_sm80(pt._weight_grad_kernel, dict(base, HAS_MASK=True, NORMALIZE=normalize, USE_NORM=True,
                                                               BLOCK_P=64, **blocks))
            assert "nvidia_mma" in ir, "no tensor-core MMA in the float16 weight gradient"
        print("ok")
        """, env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
