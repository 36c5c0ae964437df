"""torch.hub entry points: one per family of released weights.

Example:
    >>> import torch
    >>> net = torch.hub.load("<owner>/<repo>", "pac_joint_upsample", factor=8, dataset="nyu")  # doctest: +SKIP
    >>> seg = torch.hub.load("path/to/clone", "pac_crf", source="local")  # doctest: +SKIP

Joint upsampling (``task_jointUpsampling``): ``pac_joint_upsample``, ``pac_joint_upsample_lite`` and
``djif``, each with ``factor`` in (4, 8, 16) and ``dataset`` ``'nyu'`` (depth, 1 channel) or
``'sintel'`` (optical flow, 2 channels; not for the Lite model). Semantic segmentation on PASCAL VOC
(``task_semanticSegmentation``, 21 classes): ``fcn8s``, ``pac_crf``, ``pac_crf32``, ``pac_fcn`` and
``pac_fcn_crf``. Every entry point takes ``pretrained`` (default True): False builds the model with
its initial weights. Weights are downloaded once, checksum-verified where a checksum was published,
into ``$PACNET_CACHE`` or ``<torch hub dir>/checkpoints/pacnet`` (see ``weights/``), and loaded
strictly. The models expect the inputs their task programs feed them (see each task's datasets).
"""
from __future__ import annotations

import typing as _typing

import torch.nn as _nn

dependencies = ["torch", "numpy", "tqdm"]

_DATASETS = {"nyu": ("depth", 1), "sintel": ("flow", 2)}
_FACTORS = (4, 8, 16)


def _load_released(model: _nn.Module, name: str) -> _nn.Module:
    import weights  # the repository's weights/ registry (torch.hub puts the repository on sys.path)

    weights.load_into(model, weights.load_state_dict(name), strict=True, verbose=False)
    return model


def _joint(model_name: str, short: str, factor: int, dataset: str, pretrained: bool,
           kwargs: dict) -> _nn.Module:
    from task_jointUpsampling import models

    if dataset not in _DATASETS:
        raise ValueError(f"dataset: expected one of {tuple(_DATASETS)}, got {dataset!r}")
    if factor not in _FACTORS:
        raise ValueError(f"factor: expected one of {_FACTORS}, got {factor!r}")
    kind, channels = _DATASETS[dataset]
    name = f"{kind}_x{factor}_{short}"
    if pretrained:
        import weights
        if name not in weights.REGISTRY:
            raise ValueError(f"{model_name}: no released weights for dataset={dataset!r}; "
                             "pass pretrained=False to build the model")
        if kwargs:
            raise TypeError(f"{model_name}: {sorted(kwargs)} would change the released architecture; "
                            "they are only accepted with pretrained=False")
    model = getattr(models, model_name)(factor=factor, channels=channels, **kwargs)
    return _load_released(model, name) if pretrained else model


def pac_joint_upsample(factor: int = 8, dataset: str = "nyu", pretrained: bool = True,
                       **kwargs: _typing.Any) -> _nn.Module:
    """PacJointUpsample (joint depth or flow upsampling with PAC transposed convolutions).

    Args:
        factor: 4, 8 or 16.
        dataset: ``'nyu'`` (depth, NYU Depth V2) or ``'sintel'`` (optical flow, MPI-Sintel).
        pretrained: load the released weights (``depth_x<factor>_pac`` / ``flow_x<factor>_pac``).
        **kwargs: architecture arguments of ``PacJointUpsample`` (only with ``pretrained=False``).

    Returns:
        The model; ``model(target_low, guide)`` maps (B, C, H, W) and (B, 3, factor*H, factor*W)
        to (B, C, factor*H, factor*W), with C = 1 (nyu) or 2 (sintel).
    """
    return _joint("PacJointUpsample", "pac", factor, dataset, pretrained, kwargs)


def pac_joint_upsample_lite(factor: int = 8, dataset: str = "nyu", pretrained: bool = True,
                            **kwargs: _typing.Any) -> _nn.Module:
    """PacJointUpsampleLite, the smaller PAC model; weights were released for ``'nyu'`` only.

    Arguments and shapes as :func:`pac_joint_upsample` (weights ``depth_x<factor>_paclite``).
    """
    return _joint("PacJointUpsampleLite", "paclite", factor, dataset, pretrained, kwargs)


def djif(factor: int = 8, dataset: str = "nyu", pretrained: bool = True, **kwargs: _typing.Any) -> _nn.Module:
    """DJIF (Li et al., ECCV 2016), the baseline of the paper's joint upsampling tables.

    Arguments and shapes as :func:`pac_joint_upsample` (weights ``depth_x<factor>_djif`` /
    ``flow_x<factor>_djif``).
    """
    return _joint("DJIF", "djif", factor, dataset, pretrained, kwargs)


def _segmentation(weights_name: str, pretrained: bool, num_classes: int) -> _nn.Module:
    import weights
    from task_semanticSegmentation.models import create_model

    model_name = weights.REGISTRY[weights_name].model
    if pretrained and num_classes != 21:
        raise ValueError(f"num_classes: the released {model_name} weights have 21 (PASCAL VOC) classes, "
                         f"got {num_classes}; pass pretrained=False for another count")
    model = create_model(model_name, num_classes)
    return _load_released(model, weights_name) if pretrained else model


def fcn8s(pretrained: bool = True, num_classes: int = 21) -> _nn.Module:
    """FCN-8s (``--model fcn8s``), weights ``fcn8s_from_caffe`` (converted from the Caffe release).

    ``model(images)`` maps (B, 3, H, W) images, normalised as the segmentation task does, to
    (B, num_classes, H, W) logits.
    """
    return _segmentation("fcn8s_from_caffe", pretrained, num_classes)


def pac_crf(pretrained: bool = True, num_classes: int = 21) -> _nn.Module:
    """FCN-8s + PacCRF (``--model fcn8s_crfi5p4d5641p4d5161``), weights ``fcn8s_paccrf_epoch_30``."""
    return _segmentation("fcn8s_paccrf_epoch_30", pretrained, num_classes)


def pac_crf32(pretrained: bool = True, num_classes: int = 21) -> _nn.Module:
    """FCN-8s + PacCRF-32 (``--model fcn8s_crfi5p4d5321``), weights ``fcn8s_paccrf32_epoch_30``."""
    return _segmentation("fcn8s_paccrf32_epoch_30", pretrained, num_classes)


def pac_fcn(pretrained: bool = True, num_classes: int = 21) -> _nn.Module:
    """PacFCN (``--model fcn8spac``), weights ``fcn8s_pacfcn_epoch_20``; H and W must be multiples of 32."""
    return _segmentation("fcn8s_pacfcn_epoch_20", pretrained, num_classes)


def pac_fcn_crf(pretrained: bool = True, num_classes: int = 21) -> _nn.Module:
    """PacFCN + PacCRF (``--model fcn8spac_crfi5p4d5641p4d5161``), weights ``fcn8s_pacfcncrf_epoch_20``;
    H and W must be multiples of 32."""
    return _segmentation("fcn8s_pacfcncrf_epoch_20", pretrained, num_classes)
