"""pac_cpu: the compiled CPU loops of the 'taps' engine, each checked against the torch operations it replaces
(pac's window view, fold and sums) on 2-D and 3-D windows of convolutions and of transposed phases; the build
(cache, compiler failure, opt-out) and the layers' fallback to torch operations."""
import itertools
import math
import shutil

import pytest
import torch

import pac
import pac_cpu
from pac import _Band, _flat, _fold_into, _phases, _window

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def band_cases(dims: int, transposed: bool, size=None, channels: int = 3, stride: int = 2):
    """(padded input, padded guide, band) covering every output phase of a layer with 3-tap windows (stride 2 unless
    given) of an input of ``size`` (small unless given)."""
    k, s, p, d = (3,) * dims, (stride,) * dims, (1,) * dims, (1,) * dims
    size = size or ((9, 8) if dims == 2 else (6, 5, 7))
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    if transposed:  # the input padded as pac pads it for a transposed layer's phases
        out = pac._transposed_out_size(size, k, s, p, (1,) * dims, d)
        before, after = zip(*(pac._transposed_pads(k[a], s[a], p[a], d[a], size[a], out[a]) for a in range(dims)))
        x = torch.nn.functional.pad(x, pac._torch_pads(before, after))
        phases = _phases(True, k, s, p, d, out, before)
        guide = torch.randn(2, channels, *(n + 2 for n in out), dtype=torch.float64)  # output resolution, 'same' padding
    else:
        phases = _phases(False, k, s, p, d, pac._conv_out_size(tuple(n - 2 for n in size), k, s, p, d))
        guide = torch.randn_like(x)
    for per_axis in itertools.product(*phases):
        band = _Band(tuple(per_axis), 0, per_axis[0].count)
        if min(band.counts) > 0 and min(band.taps) > 0:
            yield x, guide, band


CASES = [(dims, transposed) for dims in (2, 3) for transposed in (False, True)]


@pytest.mark.parametrize("dims,transposed", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_modulate_pool_and_backward_match_torch_ops(dims, transposed, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, _, band in band_cases(dims, transposed):
        x = x.to(dtype)
        win, w = _window(x, band), pac._cpu_window(x, band)
        for kc in (1, 3):
            kernel = torch.rand(2, kc, *band.taps, *band.counts, dtype=dtype)
            torch.testing.assert_close(pac_cpu.modulate(x, _flat(kernel, band), w), _flat(win * kernel, band),
                                       **tol)
            torch.testing.assert_close(pac_cpu.pool(x, _flat(kernel, band), w),
                                       _flat((win * kernel).sum(pac._tap_dims(win)), band), **tol)
            for grad in (torch.randn(2, 3, *band.taps, *band.counts, dtype=dtype),  # conv
                         torch.randn(2, 3, *band.counts, dtype=dtype)):            # pooling
                full = grad if grad.dim() == win.dim() else grad.view(2, 3, *[1] * dims, *band.counts)
                grad_x = torch.zeros_like(x)
                grad_kernel = pac_cpu.modulate_backward(_flat(grad, band), x, _flat(kernel, band), w, grad_x, True)
                expected_x = torch.zeros_like(x)
                _fold_into(expected_x, (full * kernel).expand_as(win).contiguous(), band)
                torch.testing.assert_close(grad_x, expected_x, **tol)
                torch.testing.assert_close(grad_kernel, _flat((full * win).sum(1, keepdim=True) if kc == 1
                                                                else full * win, band), **tol)


def wide_band_cases(dims: int, transposed: bool, channels: int):
    """Bands whose rows hold whole pieces of vectors of the convolution loops and a remainder, in both dtypes:
    stride 1 and 2 (every phase of a transposed layer)."""
    size = (5, 45) if dims == 2 else (4, 3, 29)
    for stride in (1, 2):
        yield from band_cases(dims, transposed, size, channels, stride)


@pytest.mark.parametrize("dims,transposed", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,channels,out_channels", [(1, 20, 6), (2, 6, 10)])
def test_conv_loops_match_the_modulated_windows_times_the_weight(dims, transposed, dtype, groups, channels,
                                                                 out_channels):
    """conv, conv_backward_input and conv_backward_weight against modulate, modulate_backward and matmuls: output
    channel blocks and input channel vectors with a remainder, grouped weights, a kernel per channel."""
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    b = 2
    for x, _, band in wide_band_cases(dims, transposed, channels):
        x = x.to(dtype)
        w, taps = pac._cpu_window(x, band), math.prod(band.taps)
        weight = torch.randn(groups, out_channels // groups, channels // groups * taps, dtype=dtype)
        for kc in (1, channels):
            kernel = _flat(torch.rand(b, kc, *band.taps, *band.counts, dtype=dtype), band)
            modulated = pac_cpu.modulate(x, kernel, w).view(b, groups, -1, w.outputs)
            out = pac_cpu.conv(x, kernel, weight, w)
            torch.testing.assert_close(out, torch.matmul(weight, modulated).view(b, out_channels, -1), **tol)

            grad = torch.randn_like(out)
            grouped = grad.view(b, groups, -1, w.outputs)
            expected_x = torch.zeros_like(x)
            expected_kernel = pac_cpu.modulate_backward(torch.matmul(weight.transpose(1, 2), grouped).view(
                b, channels, taps, -1), x, kernel, w, expected_x, True)
            grad_x = torch.zeros_like(x)
            grad_kernel = pac_cpu.conv_backward_input(grad, x, kernel, weight, w, grad_x, True)
            torch.testing.assert_close(grad_x, expected_x, **tol)
            torch.testing.assert_close(grad_kernel, expected_kernel, **tol)
            assert pac_cpu.conv_backward_input(grad, x, kernel, weight, w, None, False) is None
            if kc == 1:
                torch.testing.assert_close(pac_cpu.conv_backward_weight(grad, x, kernel, groups, w),
                                           torch.matmul(grouped, modulated.transpose(2, 3)).sum(0), **tol)
            else:
                with pytest.raises(ValueError, match="shared by the channels"):
                    pac_cpu.conv_backward_weight(grad, x, kernel, groups, w)


@pytest.mark.parametrize("dims,transposed", CASES)
@pytest.mark.parametrize("channel_wise", [False, True])
@pytest.mark.parametrize("asym", [False, True])
def test_distance_and_backward_match_torch_ops(dims, transposed, channel_wise, asym):
    for _, guide, band in band_cases(dims, transposed):
        centre = torch.randn(2, 3, *band.counts, dtype=torch.float64)
        w = pac._cpu_window(guide, band, guide=True)
        diff = pac._guide_differences(_window(guide, band, guide=True), centre, asym)
        expected = diff.square() if channel_wise else diff.square().sum(1, keepdim=True)
        dist = pac_cpu.distance(guide, _flat(centre, band), w, channel_wise, asym)
        torch.testing.assert_close(dist, _flat(expected, band))

        grad = torch.randn_like(expected)
        grad_guide, grad_centre = torch.zeros_like(guide), torch.zeros(2, 3, dist.shape[-1], dtype=torch.float64)
        pac_cpu.distance_backward(_flat(grad, band), guide, _flat(centre, band), w, channel_wise, asym,
                                  grad_guide, grad_centre)
        expected_guide = torch.zeros_like(guide)
        _fold_into(expected_guide, (2 * diff * grad).contiguous(), band, guide=True)
        torch.testing.assert_close(grad_guide, expected_guide)
        torch.testing.assert_close(grad_centre, _flat(-(2 * diff * grad).sum(pac._tap_dims(diff)), band))


def test_windows_of_strided_dilated_reads():
    """Step 2 along the last axis and dilation 2 (the loops' strided branch)."""
    x = torch.randn(1, 2, 11, 12, dtype=torch.float64)
    band = _Band(tuple(ph[0] for ph in _phases(False, (3, 3), (2, 2), (2, 2), (2, 2), (3, 4))), 0, 3)
    kernel = torch.rand(1, 1, 3, 3, 3, 4, dtype=torch.float64)
    expected = _window(x, band) * kernel
    torch.testing.assert_close(pac_cpu.modulate(x, _flat(kernel, band), pac._cpu_window(x, band)),
                               _flat(expected, band))


def test_supports_only_cpu_float32_and_float64_of_one_dtype():
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert pac_cpu.supports(f32, f32) and pac_cpu.supports(f64, None)
    assert not pac_cpu.supports(f32, f64)
    assert not pac_cpu.supports(torch.zeros(1, dtype=torch.bfloat16))


def test_non_contiguous_tensors_are_refused():
    x = torch.randn(1, 2, 6, 6)
    band = _Band(tuple(ph[0] for ph in _phases(False, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4))), 0, 4)
    kernel = torch.rand(1, 1, 9, 16)
    with pytest.raises(ValueError, match="contiguous"):
        pac_cpu.modulate(x.transpose(2, 3), kernel, pac._cpu_window(x, band))
    with pytest.raises(ValueError, match="contiguous"):
        pac_cpu.modulate(x, kernel.transpose(2, 3).contiguous().transpose(2, 3), pac._cpu_window(x, band))


def test_pool_and_its_backward_take_strided_outputs():
    """A pool's band of whole output rows is written into a view of the whole output, and its backward reads a view
    of the output gradient (batch and channel strides of the whole tensor): the same results as with contiguous
    tensors; a last axis that is not contiguous is refused."""
    x = torch.randn(2, 3, 6, 6)
    band = _Band(tuple(ph[0] for ph in _phases(False, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4))), 0, 4)
    kernel, w = torch.rand(2, 1, 9, 16), pac._cpu_window(x, band)
    whole = torch.zeros(2, 5, 40)
    strided = whole[:, 1:4, 8:24]
    assert strided.stride() == (200, 40, 1)
    pac_cpu.pool(x, kernel, w, strided)
    torch.testing.assert_close(strided, pac_cpu.pool(x, kernel, w), rtol=0, atol=0)
    assert whole[:, 1:4, :8].eq(0).all() and whole[:, 1:4, 24:].eq(0).all() and whole[:, [0, 4]].eq(0).all()
    strided.normal_()
    grad_x, expected_x = torch.zeros_like(x), torch.zeros_like(x)
    grad_kernel = pac_cpu.modulate_backward(strided, x, kernel, w, grad_x, True)
    expected_kernel = pac_cpu.modulate_backward(strided.contiguous(), x, kernel, w, expected_x, True)
    torch.testing.assert_close(grad_x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_kernel, expected_kernel, rtol=0, atol=0)
    with pytest.raises(ValueError, match="last axis"):
        pac_cpu.modulate_backward(torch.randn(2, 3, 32)[:, :, ::2], x, kernel, w, grad_x, True)
    with pytest.raises(ValueError, match="last axis"):
        pac_cpu.pool(x, kernel, w, torch.zeros(2, 3, 32)[:, :, ::2])


def test_opt_out_runs_torch_operations(monkeypatch):
    monkeypatch.setenv("PAC_CPU_KERNELS", "0")
    assert pac_cpu.library() is None and not pac_cpu.supports(torch.zeros(1))


def test_build_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("PAC_CACHE_DIR", str(tmp_path))
    assert pac_cpu._build() is not None
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("pac_cpu_") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert pac_cpu._build() is not None
    assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp  # not rebuilt


def test_failed_builds_warn_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PAC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="building the CPU loops .* failed"):
        assert pac_cpu._build() is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("CC", "cc")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PAC_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    with pytest.warns(RuntimeWarning, match="building the CPU loops .* failed"):
        assert pac_cpu._build() is None
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert pac_cpu._build() is None


def test_layers_agree_with_and_without_the_compiled_loops(monkeypatch):
    """float32 forward and every gradient of the three layers, with the loops and as torch operations."""
    torch.manual_seed(0)
    x, guide = torch.randn(2, 4, 12, 11), torch.randn(2, 3, 12, 11)
    mask = (torch.rand(2, 1, 12, 11) > 0.2).float()
    layers = [(pac.PacConv2d(4, 5, 5, padding=2, kernel_type="inv_0.5_-0.5_asym"), guide, {}),
              (pac.PacConv2d(4, 4, 3, stride=2, padding=1, normalize_kernel=True, groups=2), guide, {"mask": mask}),
              (pac.PacConvTranspose2d(4, 3, 5, 2, 2, 1), torch.randn(2, 3, 24, 22), {}),
              (pac.PacPool2d(3, padding=1, channel_wise=True, kernel_type="inv_0.2_0.2", out_channels=3),
               torch.randn(2, 3, 12, 11), {})]
    for module, g, extra in layers:
        if isinstance(module, pac.PacPool2d):
            x_in = torch.randn(2, 3, 12, 11)
        else:
            x_in = x
        results = []
        for loops in ("1", "0"):
            monkeypatch.setenv("PAC_CPU_KERNELS", loops)
            xi, gi = x_in.clone().requires_grad_(), g.clone().requires_grad_()
            out = module(xi, gi, **extra)
            out = out[0] if isinstance(out, tuple) else out
            out.square().sum().backward()
            results.append([out.detach(), xi.grad, gi.grad] + [p.grad.clone() for p in module.parameters()])
            module.zero_grad()
        for compiled, plain in zip(*results):
            torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
