"""PAC layers on CUDA tensors against CPU float64: every layer and implementation, AMP, torch.compile and
determinism. Needs a CUDA device; skipped cleanly without one (and excluded from the default run):

    python -m pytest -m cuda tests/test_cuda.py

Implementations: every ``impl`` of the pac modules ('unfold', 'taps', and 'triton' when triton is installed).
"""
import os

import pytest
import torch

import pac

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

DEVICE = torch.device("cuda")
IMPLS = ["unfold", "taps", "triton"]
LAYERS = ["conv", "conv_transpose", "pool"]


@pytest.fixture(scope="module")
def pac_triton():
    """pac_triton compiled for the GPU (not the interpreter), or a skip."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the fused kernels would be interpreted, not compiled")
    import pac_triton as module
    if module._INTERPRETED:
        pytest.skip("pac_triton was imported under the Triton interpreter")
    return module


def make_layer(layer: str, normalize: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if layer == "conv":
        return pac.PacConv2d(8, 12, 5, stride=1, padding=2, normalize_kernel=normalize)
    if layer == "conv_transpose":
        return pac.PacConvTranspose2d(8, 6, 5, stride=2, padding=2, output_padding=1, normalize_kernel=normalize)
    return pac.PacPool2d(3, stride=2, padding=1, normalize_kernel=normalize)


def make_inputs(layer: str, batch: int = 2, size=(17, 22)):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 8, *size, generator=gen)
    guide_hw = tuple(2 * n for n in size) if layer == "conv_transpose" else size
    return x, torch.randn(batch, 3, *guide_hw, generator=gen)


def run_impl(impl: str, module: torch.nn.Module, x: torch.Tensor, guide: torch.Tensor, pac_triton=None):
    """The layer's output with one implementation."""
    module.impl = impl
    return module(x, guide)


def outputs_and_grads(impl, module, x, guide, pac_triton=None):
    """(output, [grad x, grad guide, grads of the parameters]) for a fixed upstream gradient."""
    x, guide = x.clone().requires_grad_(), guide.clone().requires_grad_()
    out = run_impl(impl, module, x, guide, pac_triton)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    leaves = [x, guide] + list(module.parameters())
    return out, list(torch.autograd.grad(out, leaves, grad_out))


def _triton_or_none(impl, request):
    return request.getfixturevalue("pac_triton") if impl == "triton" else None


def assert_close_scaled(got, expected, tol, name):
    err = (got.double().cpu() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", LAYERS)
def test_cuda_float32_matches_cpu_float64(layer, impl, normalize, request):
    pt = _triton_or_none(impl, request)
    x, guide = make_inputs(layer)
    reference = make_layer(layer, normalize).double()
    expected, expected_grads = outputs_and_grads("taps", reference, x.double(), guide.double())
    module = make_layer(layer, normalize).to(DEVICE)
    # float32 products: torch's matmuls do not use TF32 by default, and the Triton kernels follow
    # torch.get_float32_matmul_precision() ('highest' by default).
    out, grads = outputs_and_grads(impl, module, x.to(DEVICE), guide.to(DEVICE), pt)
    assert out.is_cuda and out.dtype == torch.float32
    assert_close_scaled(out, expected, 1e-4, "output")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close_scaled(g, e, 1e-4, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", LAYERS)
def test_autocast(layer, impl, dtype, request):
    pt = _triton_or_none(impl, request)
    x, guide = make_inputs(layer)
    expected, _ = outputs_and_grads("taps", make_layer(layer, True).double(), x.double(), guide.double())
    module = make_layer(layer, True).to(DEVICE)
    with torch.autocast("cuda", dtype=dtype):
        out, grads = outputs_and_grads(impl, module, x.to(DEVICE), guide.to(DEVICE), pt)
    assert out.dtype == dtype
    assert all(torch.isfinite(g).all() for g in grads)
    assert_close_scaled(out, expected, 2e-2 if dtype == torch.float16 else 6e-2, "output")


@pytest.mark.parametrize("layer, impl", [("conv", "unfold"), ("conv", "taps")] + [(layer, "triton") for layer in LAYERS])
def test_torch_compile(layer, impl, request):  # a few cases: every inductor compile takes tens of seconds
    pt = _triton_or_none(impl, request)
    x, guide = (t.to(DEVICE) for t in make_inputs(layer))
    module = make_layer(layer, True).to(DEVICE)
    eager, eager_grads = outputs_and_grads(impl, module, x, guide, pt)
    # run_impl has selected the implementation eagerly: the compiled function only calls the layer.
    compiled = torch.compile(module)
    xs, gs = x.clone().requires_grad_(), guide.clone().requires_grad_()
    out = compiled(xs, gs)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out, [xs, gs], torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
                                .to(out))
    for g, e in zip(grads, eager_grads[:2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", LAYERS)
def test_deterministic_output(layer, impl, request):
    pt = _triton_or_none(impl, request)
    x, guide = (t.to(DEVICE) for t in make_inputs(layer, batch=4, size=(40, 37)))
    module = make_layer(layer).to(DEVICE)
    with torch.no_grad():
        first, second = (run_impl(impl, module, x, guide, pt) for _ in range(2))
    assert torch.equal(first, second)


def test_triton_with_mask_matches_pac(pac_triton):
    x, guide = (t.to(DEVICE) for t in make_inputs("conv"))
    mask = (torch.rand(2, 1, *x.shape[2:], device=DEVICE) > 0.3).float()
    module = make_layer("conv", normalize=True).to(DEVICE)
    expected, expected_mask = module(x, guide, mask=mask)
    out, out_mask = pac_triton.pac_conv2d(x, guide, module.weight, module.bias, 1, 2, 1, 1, True, mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_mask, expected_mask)


def test_triton_supports_cuda_tensors(pac_triton):
    x, guide = (t.to(DEVICE) for t in make_inputs("conv"))
    assert pac_triton.is_available()
    assert pac_triton.supports("conv", x, guide, kernel_type="gaussian", smooth_kernel_type="none",
                               normalize_kernel=True, channel_wise=False, shared_filters=False, groups=1,
                               padding_mode="zeros", mask=None, stride=1, padding=2, dilation=1, output_padding=0)
    assert not pac_triton.supports("conv", x.cpu(), guide.cpu())


@pytest.mark.parametrize("layer", LAYERS)
def test_auto_picks_triton_when_supported_and_taps_otherwise(layer, pac_triton, monkeypatch):
    """impl='auto' on CUDA runs the fused kernels for supported options, and falls back to 'taps' (same
    numbers) for options they do not support (here an 'inv' kernel)."""
    name = {"conv": "pac_conv2d", "conv_transpose": "pac_conv_transpose2d", "pool": "pac_pool2d"}[layer]
    calls = []
    original = getattr(pac_triton, name)
    monkeypatch.setattr(pac_triton, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    x, guide = (t.to(DEVICE) for t in make_inputs(layer))
    module = make_layer(layer).to(DEVICE)
    auto = module(x, guide)
    assert calls == [name]
    module.impl = "taps"
    torch.testing.assert_close(auto, module(x, guide), rtol=1e-4, atol=1e-4)
    unsupported = make_layer(layer).to(DEVICE)
    unsupported.kernel_type = "inv_1_-1"
    unsupported.register_buffer("inv_alpha", torch.tensor(1.0, device=DEVICE))
    unsupported.register_buffer("inv_lambda", torch.tensor(-1.0, device=DEVICE))
    unsupported(x, guide)
    assert calls == [name]
