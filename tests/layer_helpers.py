"""Helpers shared by the layer tests of the 2-D and 3-D PAC layers."""
import torch
import torch.nn as nn

DT = torch.float64


def rand(*shape, dtype=DT, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def unpack(result):
    """Module outputs are a tensor, or (tensor, output_mask) when a mask was given."""
    return result if isinstance(result, tuple) else (result, None)


def randomise_kernel_params(module):
    """Move learnable kernel parameters away from their init so the test sees them being used."""
    with torch.no_grad():
        for name in ('inv_alpha', 'inv_lambda', 'smooth_kernel'):
            value = getattr(module, name, None)
            if isinstance(value, nn.Parameter):
                value.add_(0.1 * torch.rand_like(value))


def max_abs_over_resets(module, names, resets=20):
    """Largest |value| of the named tensors over several reset_parameters() draws."""
    largest = 0.0
    for _ in range(resets):
        module.reset_parameters()
        largest = max(largest, max(getattr(module, name).abs().max().item() for name in names))
    return largest
