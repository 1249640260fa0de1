"""Teacher and student builders, one name each.

``convnet`` is the classic dataset-distillation ConvNet (conv 3x3 -> norm ->
ReLU -> avg-pool, repeated) with BatchNorm in place of instance norm, so that
BN-matching synthesis has statistics to match. torchvision families get a
small-image stem (3x3 conv, stride 1, no max-pool) for inputs of 64 px or less.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

ARCHS = ("convnet", "resnet18", "resnet50", "mobilenet_v2")


NORMS = ("batch", "instance")  # convnet's normalisation: BatchNorm, or instance norm (per image, as in DC/DM)


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 64, depth: int = 3,
                 norm: str = "batch"):
        super().__init__()
        layers, c, size = [], in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(width, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, size = width, size // 2
        if size < 1:
            raise ValueError(f"depth {depth} pools a {image_size}-px image below 1 px")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 224, *,
                width: int = 64, depth: int = 3, small_stem: bool | None = None,
                pretrained: bool = False, norm: str = "batch") -> nn.Module:
    """Build ``arch`` for ``num_classes`` and ``in_channels`` x ``image_size`` inputs.

    ``small_stem`` defaults to True for images of 64 px or less. ``pretrained``
    loads torchvision's ImageNet weights from the local torch hub cache only.
    """
    if arch == "convnet":
        if pretrained:
            raise ValueError("no pretrained weights exist for convnet; train it with `dsutil squeeze`")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
        return ConvNet(in_channels, num_classes, image_size, width, depth, norm)
    if norm != "batch":
        raise ValueError(f"norm={norm!r} is a convnet option; {arch} keeps its BatchNorm")
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; expected one of {', '.join(ARCHS)}")
    import torchvision.models as tvm

    small_stem = image_size <= 64 if small_stem is None else small_stem
    weights = _cached_weights(arch) if pretrained else None
    model = getattr(tvm, arch)(weights=weights)
    if arch.startswith("resnet"):
        if small_stem or in_channels != 3:
            k, s, p = (3, 1, 1) if small_stem else (7, 2, 3)
            model.conv1 = nn.Conv2d(in_channels, 64, k, s, p, bias=False)
        if small_stem:
            model.maxpool = nn.Identity()
        if num_classes != model.fc.out_features:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:  # mobilenet_v2
        first = model.features[0][0]
        if small_stem or in_channels != 3:
            model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1 if small_stem else 2, 1, bias=False)
        if num_classes != model.classifier[-1].out_features:
            model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def _cached_weights(arch: str):
    """torchvision's default weights, only if already in the torch hub cache (nothing downloads)."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(arch).DEFAULT
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    path = hub / Path(weights.url).name
    if not path.exists():
        raise FileNotFoundError(f"pretrained {arch} weights not found at {path}; download {weights.url} "
                                f"there on a machine with internet access, or pass a checkpoint path")
    return weights


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last Linear layer: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's input features for images ``x`` (a tensor or an ImageSet: eval mode, batched)."""
    return torch.cat([f for f, _ in feature_batches(model, ((x[i:i + batch_size], None)
                                                            for i in range(0, len(x), batch_size)))])


@torch.no_grad()
def feature_batches(model: nn.Module, batches):
    """``(features, labels)`` for each ``(normalised images, labels)`` batch: the classifier's input, on the
    CPU as float32; a stream, so an analysis holds one batch at a time."""
    layer, feats = classifier_layer(model), []
    hook = layer.register_forward_hook(lambda m, inp, out: feats.append(inp[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x, y in batches:
            model(x.to(device))
            yield feats.pop(), y
    finally:
        hook.remove()
        model.train(was_training)
