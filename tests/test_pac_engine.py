"""The 'taps' engine: the fused path (kernel computed inside ``pac::filter`` from the guide) checked with
float64 gradcheck on every input and parameter for every option (with the CPU band loops compiled and as torch
operations), the registered ops with
``torch.library.opcheck``, and PyTorch's transforms and exporters on the default path."""
import threading

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import pac
from pac import PacConv2d, PacConvTranspose2d, PacPool2d
from pac_reference import ref_kernel, ref_pacconv2d

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=DT, requires_grad=grad)


def perturb_parameters(module):
    """Move every parameter away from its init, so that a gradient that ignores one shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.rand_like(p))
    return module


def gradcheck_module(module, x, guide, mask=None):
    """gradcheck of the module's output with respect to the input, the guide and every parameter."""
    perturb_parameters(module.double())
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]

    def fn(x, guide, *values):
        out = functional_call(module, dict(zip(names, values)), (x, guide), {} if mask is None else {"mask": mask})
        return out[0] if isinstance(out, tuple) else out

    assert gradcheck(fn, (x, guide, *params))


CONV_OPTIONS = {
    "gaussian": dict(),
    "stride_dilation": dict(stride=2, dilation=2, padding=2),
    "inv": dict(kernel_type="inv_0.5_-0.5"),
    "inv_asym": dict(kernel_type="inv_0.2_0.2_asym"),
    "inv_fixed": dict(kernel_type="inv_1_-1_fixed"),
    "smooth_full": dict(smooth_kernel_type="full_3"),
    "smooth_gaussian_normalised": dict(smooth_kernel_type="gaussian", normalize_kernel=True),
    "normalised": dict(normalize_kernel=True, stride=2),
    "groups": dict(groups=2),
    "shared": dict(shared_filters=True),
    "reflect": dict(padding_mode="reflect", normalize_kernel=True),
    "circular": dict(padding_mode="circular"),
    "replicate_inv": dict(padding_mode="replicate", kernel_type="inv_0.2_0.2"),
}


@pytest.mark.parametrize("options", CONV_OPTIONS.values(), ids=CONV_OPTIONS.keys())
def test_fused_conv_gradcheck(options, cpu_loops):
    options = {"padding": 1, **options}
    gradcheck_module(PacConv2d(2, 2, 3, impl="taps", **options), rand(1, 2, 6, 5), rand(1, 2, 6, 5))


@pytest.mark.parametrize("normalize", [False, True])
def test_fused_conv_gradcheck_with_mask(normalize, cpu_loops):
    mask = (torch.rand(2, 1, 6, 5) > 0.4).to(DT)
    module = PacConv2d(2, 2, 3, stride=2, padding=1, normalize_kernel=normalize, kernel_type="inv_0.5_-0.5",
                       impl="taps")
    gradcheck_module(module, rand(2, 2, 6, 5), rand(2, 2, 6, 5), mask)


TRANSPOSED_OPTIONS = {
    "s2": dict(stride=2, padding=1, output_padding=1),
    "s3_k5_d2": dict(kernel_size=5, stride=3, padding=3, output_padding=2, dilation=2),
    "s2_normalised_inv": dict(stride=2, padding=1, output_padding=1, normalize_kernel=True,
                              kernel_type="inv_0.5_-0.5_asym"),
    "s2_smooth_shared": dict(stride=2, padding=1, smooth_kernel_type="full_3", shared_filters=True),
}


@pytest.mark.parametrize("options", TRANSPOSED_OPTIONS.values(), ids=TRANSPOSED_OPTIONS.keys())
def test_fused_conv_transpose_gradcheck(options, cpu_loops):
    options = {"kernel_size": 3, **options}
    module = PacConvTranspose2d(2, 2, impl="taps", **options)
    x = rand(1, 2, 3, 3)
    out_hw = module._layer(1).out_size(x.shape[2:])
    gradcheck_module(module, x, rand(1, 2, *out_hw))


@pytest.mark.parametrize("normalize", [False, True])
def test_fused_conv_transpose_gradcheck_with_mask(normalize, cpu_loops):
    module = PacConvTranspose2d(2, 2, 3, 2, 1, 1, normalize_kernel=normalize, impl="taps")
    mask = (torch.rand(1, 1, 4, 3) > 0.3).to(DT)
    gradcheck_module(module, rand(1, 2, 4, 3), rand(1, 1, 8, 6), mask)


POOL_OPTIONS = {
    "sum": dict(),
    "normalised_stride": dict(normalize_kernel=True, stride=2),
    "channel_wise_inv": dict(channel_wise=True, kernel_type="inv_0.5_-0.5", out_channels=3),
    "channel_wise_asym_normalised": dict(channel_wise=True, kernel_type="inv_0.2_0.2_asym", out_channels=3,
                                         normalize_kernel=True),
    "smooth_average_dilation": dict(smooth_kernel_type="average_3", dilation=2, padding=2),
}


@pytest.mark.parametrize("options", POOL_OPTIONS.values(), ids=POOL_OPTIONS.keys())
def test_fused_pool_gradcheck(options, cpu_loops):
    options = {"padding": 1, **options}
    gradcheck_module(PacPool2d(3, impl="taps", **options), rand(1, 3, 6, 5), rand(1, 3, 6, 5))


def test_fused_pool_gradcheck_with_mask(cpu_loops):
    mask = (torch.rand(1, 1, 6, 5) > 0.3).to(DT)
    gradcheck_module(PacPool2d(3, padding=1, normalize_kernel=True, impl="taps"), rand(2, 2, 6, 5),
                     rand(2, 2, 6, 5), mask)


def test_every_weight_tap_gets_its_gradient():
    """Each tap's weight gradient against the reference (an indexing slip would leave taps at zero)."""
    x, guide = rand(2, 3, 9, 8), rand(2, 2, 9, 8)
    module = PacConv2d(3, 4, 5, stride=2, padding=2, impl="taps").double()
    module(x, guide).square().sum().backward()
    weight = module.weight.detach().clone().requires_grad_()
    kernel, _ = ref_kernel(guide.detach(), kernel_size=5, stride=2, padding=2)
    ref_pacconv2d(x.detach(), kernel, weight, module.bias.detach(), 2, 2).square().sum().backward()
    assert (weight.grad.abs().sum((0, 1)) > 0).all()
    torch.testing.assert_close(module.weight.grad, weight.grad)


def assert_band_size_does_not_change_results(monkeypatch, module, x, guide, threads):
    """Outputs and all gradients are the same with one band and with one band per row, on ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for band_bytes in (1 << 30, 1):
            monkeypatch.setattr(pac, "_CPU_BAND_BYTES", band_bytes)
            xs, gs = x.detach().clone().requires_grad_(), guide.detach().clone().requires_grad_()
            out = module(xs, gs)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=DT).view(out.shape))
            results.append((out, xs.grad, gs.grad, module.weight.grad.clone()))
            module.zero_grad()
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_band_size_does_not_change_results(monkeypatch):
    module = PacConvTranspose2d(3, 2, 5, 2, 2, 1, normalize_kernel=True, impl="taps").double()
    assert_band_size_does_not_change_results(monkeypatch, module, rand(2, 3, 11, 9), rand(2, 2, 22, 18), threads=2)


def test_transposed_bands_copy_only_the_guide_rows_they_read(monkeypatch, cpu_loops):
    """A stride-4 transposed layer reads its guide every 4th row along the first axis in each output phase: its bands
    copy only those rows and take their windows' own centres from the guide itself. Outputs and gradients match the
    unfold path."""
    steps = []
    copy_rows = pac._padded_rows
    monkeypatch.setattr(pac, "_padded_rows", lambda t, pads, rows: steps.append(rows[2]) or copy_rows(t, pads, rows))
    x, guide = rand(2, 3, 5, 6), rand(2, 2, 20, 24)
    results = []
    for impl in ("taps", "unfold"):
        torch.manual_seed(1)
        module = PacConvTranspose2d(3, 2, 9, stride=4, padding=3, output_padding=1, normalize_kernel=True,
                                    impl=impl).double()
        out = module(x, guide)
        results.append((out, *torch.autograd.grad((out * out.cos()).sum(), (x, guide, module.weight))))
    for taps, unfold in zip(*results):
        torch.testing.assert_close(taps, unfold)
    assert 4 in steps


@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (5, 1, 1), (5, 2, 1), (3, 1, 3), (7, 3, 2)])
@pytest.mark.parametrize("band_bytes", [1, 3000, 1 << 30])
def test_bands_of_a_disjoint_set_read_disjoint_rows(monkeypatch, k, s, d, band_bytes):
    """The backward folds the bands of one set in parallel: their input and guide rows must not overlap."""
    monkeypatch.setattr(pac, "_CPU_BAND_BYTES", band_bytes)
    first = pac._conv_phases(k, s, d, 40)[0]
    bands = pac._bands([first, first], 1000, torch.device("cpu"), guide=True)
    assert [b.t0 for b in bands] == sorted({b.t0 for b in bands}) and bands[-1].t1 == 40
    for disjoint in pac._disjoint_sets(bands, bands[0], guide=True):
        for guide in (False, True):
            rows = [{r0 + t * step + i * dil for t in range(b.t1 - b.t0) for i in range(k)}
                    for b in disjoint for r0, step, dil in [pac._reads(b, guide)[0]]]
            assert sum(map(len, rows)) == len(set().union(*rows))


def test_one_row_bands_fold_like_one_band(monkeypatch):
    """3-D rows larger than the band budget make one-row bands folded in several sets, on two threads."""
    module = pac.PacConv3d(2, 2, 5, padding=2, kernel_type="inv_0.5_-0.5", impl="taps").double()
    assert_band_size_does_not_change_results(monkeypatch, module, rand(1, 2, 7, 5, 4), rand(1, 2, 7, 5, 4), threads=2)


def test_ops_run_single_threaded_on_their_own_threads(monkeypatch):
    """With two torch threads, an op's body runs on a one-thread coordinator and its bands on one-thread workers;
    the caller keeps its two threads."""
    seen = []

    def record(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, threading.current_thread().name, torch.get_num_threads()))
            return fn(*args, **kwargs)
        monkeypatch.setattr(pac, name, wrapped)

    record("_prepare_filter", pac._prepare_filter)
    record("_band_kernel", pac._band_kernel)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        module = PacConv2d(3, 4, 3, padding=1, impl="taps")
        module(torch.rand(1, 3, 8, 8, requires_grad=True), torch.rand(1, 2, 8, 8)).sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    bodies = [s for s in seen if s[0] == "_prepare_filter"]
    bands = [s for s in seen if s[0] == "_band_kernel"]
    assert len(bodies) == 2 and all(name.startswith("pac-op") and threads == 1 for _, name, threads in bodies)
    assert bands and all(name.startswith("pac-band") and threads == 1 for _, name, threads in bands)


# ---------------------------------------------------------------- the registered ops


def op_samples():
    """(op, args) samples covering the filter and kernel ops with and without a guide, mask, weight, and with the
    guide's own window centres (centre None) or a smoothed centre."""
    x, guide = rand(1, 3, 8, 7), rand(1, 2, 8, 7)
    conv = PacConv2d(3, 4, 3, stride=2, padding=1, kernel_type="inv_0.5_-0.5", normalize_kernel=True,
                     impl="taps").double()
    mask = (torch.rand(1, 1, 8, 7) > 0.3).to(DT)
    captured = []
    filter_op = torch.ops.pac.filter.default

    def record(*args):  # (as leaves: opcheck differentiates every sample several times)
        captured.append((filter_op, tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                                          else a for a in args)))
        return filter_op(*args)

    original = pac._FilterFn.forward
    try:
        pac._FilterFn.forward = staticmethod(record)
        conv(x, guide, mask=mask)
        PacConvTranspose2d(3, 2, 3, 2, 1, 1, impl="taps").double()(x, rand(1, 2, 16, 14))
        PacPool2d(3, padding=1, channel_wise=True, normalize_kernel=True, impl="taps")(x, rand(1, 3, 8, 7))
        PacConv2d(3, 2, 3, padding=1, smooth_kernel_type="gaussian", impl="taps").double()(x, guide)
        kernel, _ = conv.compute_kernel(guide)
        pac.pacconv2d(x, kernel.detach().requires_grad_(), conv.weight, None, 2, 1, impl="taps")
    finally:
        pac._FilterFn.forward = original
    layer = pac._Layer((3, 3), (2, 2), (1, 1), (0, 0), (1, 1), False, 1, "zeros")
    geometry, options = pac._encode(layer, (4, 4), "inv_0.5_-0.5", False, True, kernel_given=False)
    kernel_args = (guide.detach().requires_grad_(), rand(1, 2, 4, 4).requires_grad_(), mask,
                   conv.inv_alpha.detach().requires_grad_(), conv.inv_lambda.detach().requires_grad_(),
                   geometry, options)
    own_centres = (kernel_args[0], None) + kernel_args[2:]
    assert [args[4] is None for _, args in captured] == [True, True, True, False, True]
    return captured + [(torch.ops.pac.kernel.default, kernel_args), (torch.ops.pac.kernel.default, own_centres)]


def test_opcheck_every_op():
    samples = op_samples()
    assert len(samples) == 7
    for op, args in samples:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- torch.func


def small_conv():
    return PacConv2d(2, 3, 3, padding=1, kernel_type="inv_0.5_-0.5", normalize_kernel=True).double()


def test_vmap_matches_a_loop():
    module = small_conv()
    x, guide = rand(4, 1, 2, 6, 5, grad=False), rand(4, 1, 3, 6, 5, grad=False)
    batched = torch.func.vmap(module)(x, guide)
    torch.testing.assert_close(batched, torch.stack([module(a, b) for a, b in zip(x, guide)]))


def test_per_sample_gradients_match_a_loop():
    module = small_conv()
    params = {k: v.detach() for k, v in module.named_parameters()}
    x, guide = rand(3, 2, 6, 5, grad=False), rand(3, 3, 6, 5, grad=False)

    def loss(params, x, guide):
        return functional_call(module, params, (x[None], guide[None])).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, guide)
    for i in range(3):
        module.zero_grad()
        module(x[i:i + 1], guide[i:i + 1]).square().sum().backward()
        for name, p in module.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)


def test_jacrev_matches_autograd_jacobian():
    module = PacPool2d(3, padding=1, normalize_kernel=True)
    x, guide = rand(1, 1, 4, 4, grad=False), rand(1, 2, 4, 4, grad=False)
    jac = torch.func.jacrev(module, argnums=(0, 1))(x, guide)
    expected = torch.autograd.functional.jacobian(lambda a, b: module(a, b, ), (x, guide))
    for a, b in zip(jac, expected):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- torch.export, compile, tracing


class Net(torch.nn.Module):
    """A conv, a transposed conv and a pool on the default path: every op of the engine in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = PacConv2d(3, 4, 3, padding=1, normalize_kernel=True)
        self.up = PacConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, kernel_type="inv_0.5_-0.5")
        self.pool = PacPool2d(3, padding=1, normalize_kernel=True)

    def forward(self, x, guide, guide_up):
        y = self.conv(x, guide)
        return self.pool(self.up(y, guide_up), guide_up)


def net_inputs(batch, h, w):
    return torch.randn(batch, 3, h, w), torch.randn(batch, 2, h, w), torch.randn(batch, 2, 2 * h, 2 * w)


def test_export_with_dynamic_batch_height_width():
    net = Net().eval()
    batch, h, w = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("h", min=4, max=64), \
        torch.export.Dim("w", min=4, max=64)
    shapes = ({0: batch, 2: h, 3: w}, {0: batch, 2: h, 3: w}, {0: batch, 2: 2 * h, 3: 2 * w})
    exported = torch.export.export(net, net_inputs(2, 8, 9), dynamic_shapes=shapes)
    other = net_inputs(3, 13, 6)
    torch.testing.assert_close(exported.module()(*other), net(*other))
    assert any("pac.filter" in str(node.target) for node in exported.graph.nodes)


def test_compile_keeps_the_ops_and_handles_new_shapes():
    net = Net()
    compiled = torch.compile(net, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in ((2, 8, 9), (1, 11, 7)):
        inputs = [t.requires_grad_() for t in net_inputs(*shape)]
        out = compiled(*inputs)
        torch.testing.assert_close(out, net(*inputs))
        out.sum().backward()
        assert all(t.grad is not None for t in inputs)


def test_jit_trace_runs_the_unfold_path():
    net = Net().eval()
    traced = torch.jit.trace(net, net_inputs(1, 8, 8), check_trace=False)
    other = net_inputs(1, 8, 8)
    torch.testing.assert_close(traced(*other), net(*other))


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_with_dynamic_shapes_runs_in_onnxruntime(tmp_path, dynamo):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net = Net().eval()
    path = tmp_path / "net.onnx"
    names = ["x", "guide", "guide_up"]
    if dynamo:
        batch, h, w = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("h", min=4, max=64), \
            torch.export.Dim("w", min=4, max=64)
        shapes = ({0: batch, 2: h, 3: w}, {0: batch, 2: h, 3: w}, {0: batch, 2: 2 * h, 3: 2 * w})
        torch.onnx.export(net, net_inputs(2, 8, 9), str(path), dynamo=True, dynamic_shapes=shapes, input_names=names)
    else:
        axes = {name: {0: "batch", 2: f"h_{name}", 3: f"w_{name}"} for name in names}
        torch.onnx.export(net, net_inputs(2, 8, 9), str(path), dynamo=False, input_names=names, dynamic_axes=axes,
                          opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = net_inputs(3, 12, 7)
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(names, other)})
    torch.testing.assert_close(torch.from_numpy(out), net(*other), rtol=1e-4, atol=1e-5)


def _filter_in_child(queue) -> None:
    torch.set_num_threads(2)
    out = PacConv2d(3, 4, 3, padding=1, impl="taps")(torch.rand(1, 3, 16, 16), torch.rand(1, 2, 16, 16))
    queue.put(tuple(out.shape))


def test_a_forked_child_gets_new_worker_threads():
    """A child forked after the parent's PAC calls must not wait on the parent's pool threads (they are gone)."""
    import multiprocessing

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        PacConv2d(3, 4, 3, padding=1, impl="taps")(torch.rand(1, 3, 16, 16), torch.rand(1, 2, 16, 16))
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_filter_in_child, args=(queue,))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
        assert not child.is_alive() and child.exitcode == 0 and queue.get(timeout=5) == (1, 4, 16, 16)
    finally:
        torch.set_num_threads(previous)
