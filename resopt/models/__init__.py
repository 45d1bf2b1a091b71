"""The model registry: one table of architecture name -> builder, importable without torch.

``build_model`` makes a fresh model; ``model_from_checkpoint`` rebuilds a trained (possibly pruned)
one from a plain checkpoint dict: the base architecture is built from its name and kwargs, then every
conv / linear / batch-norm layer whose recorded width differs (a pruned layer) is replaced by one of
the recorded shape before the state dict is loaded. No pickled modules are ever needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resopt.errors import InputFileError, MissingDependencyError, UsageError, choice_error

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    family: str  # "imagenet-resnet", "cifar-resnet", "vgg", ...
    default_input_size: int
    builder: Callable[..., nn.Module]
    torchvision_name: str | None = None  # for --pretrained


def _tv_resnet(block_name: str, layers: list[int], cifar_stem: bool = False) -> Callable[..., nn.Module]:
    def build(num_classes: int, width: float = 1.0) -> nn.Module:
        from torchvision.models import resnet as tvr

        from resopt.models.resnet import TorchvisionStyleResNet

        return TorchvisionStyleResNet(getattr(tvr, block_name), layers, num_classes=num_classes, width=width,
                                      cifar_stem=cifar_stem)

    return build


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, width: float = 1.0) -> nn.Module:
        from resopt.models.resnet import CifarResNet

        return CifarResNet(depth, num_classes=num_classes, width=width)

    return build


def _cifar_variant(kind: str, depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, width: float = 1.0) -> nn.Module:
        from resopt.models import variants

        cls = variants.DSResNet if kind == "ds" else variants.SEResNet
        return cls(depth, num_classes=num_classes, width=width)

    return build


def _vgg16_bn_cifar(num_classes: int, width: float = 1.0) -> nn.Module:
    from resopt.models.vgg import VGGCifar

    return VGGCifar(num_classes=num_classes, width=width)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("resnet18", "ResNet-18, ImageNet stem (torchvision names)", "imagenet-resnet", 224,
                  _tv_resnet("BasicBlock", [2, 2, 2, 2]), "resnet18"),
        ModelSpec("resnet34", "ResNet-34, ImageNet stem (torchvision names)", "imagenet-resnet", 224,
                  _tv_resnet("BasicBlock", [3, 4, 6, 3]), "resnet34"),
        ModelSpec("resnet50", "ResNet-50, ImageNet stem (torchvision names)", "imagenet-resnet", 224,
                  _tv_resnet("Bottleneck", [3, 4, 6, 3]), "resnet50"),
        ModelSpec("resnet18-cifar", "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32",
                  "cifar-resnet18", 32, _tv_resnet("BasicBlock", [2, 2, 2, 2], cifar_stem=True)),
        ModelSpec("resnet20", "CIFAR ResNet-20 (He et al. 2016), 0.27M params", "cifar-resnet", 32,
                  _cifar_resnet(20)),
        ModelSpec("resnet32", "CIFAR ResNet-32 (He et al. 2016), 0.46M params", "cifar-resnet", 32,
                  _cifar_resnet(32)),
        ModelSpec("resnet44", "CIFAR ResNet-44 (He et al. 2016), 0.66M params", "cifar-resnet", 32,
                  _cifar_resnet(44)),
        ModelSpec("resnet56", "CIFAR ResNet-56 (He et al. 2016), 0.85M params", "cifar-resnet", 32,
                  _cifar_resnet(56)),
        ModelSpec("resnet110", "CIFAR ResNet-110 (He et al. 2016), 1.7M params", "cifar-resnet", 32,
                  _cifar_resnet(110)),
        ModelSpec("resnet20-ds", "ResNet-20 with depthwise-separable 3x3 convolutions (pruning studies)",
                  "cifar-resnet-ds", 32, _cifar_variant("ds", 20)),
        ModelSpec("resnet56-ds", "ResNet-56 with depthwise-separable 3x3 convolutions (pruning studies)",
                  "cifar-resnet-ds", 32, _cifar_variant("ds", 56)),
        ModelSpec("resnet20-se", "ResNet-20 with squeeze-and-excitation gates (pruning studies)",
                  "cifar-resnet-se", 32, _cifar_variant("se", 20)),
        ModelSpec("resnet56-se", "ResNet-56 with squeeze-and-excitation gates (pruning studies)",
                  "cifar-resnet-se", 32, _cifar_variant("se", 56)),
        ModelSpec("vgg16-bn-cifar", "VGG-16 with batch norm, CIFAR classifier", "vgg", 32, _vgg16_bn_cifar),
    ]
}


def get_spec(arch: str) -> ModelSpec:
    if arch not in REGISTRY:
        raise choice_error("architecture", arch, sorted(REGISTRY))
    return REGISTRY[arch]


def arch_names() -> list[str]:
    return list(REGISTRY)


def build_model(arch: str, num_classes: int, *, width: float = 1.0, pretrained: bool = False,
                blocks: list[int] | None = None) -> nn.Module:
    """A fresh ``arch``; ``blocks`` (blocks per residual stage, as block pruning records them) keeps only the
    first that many blocks of each stage."""
    spec = get_spec(arch)
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.05 <= width <= 4.0:
        raise UsageError(f"width must be between 0.05 and 4, got {width}")
    model = spec.builder(num_classes=num_classes, width=width)
    if pretrained:
        load_pretrained(model, spec, width=width)
    if blocks is not None:
        set_stage_depths(model, blocks)
    return model


def load_pretrained(model: nn.Module, spec: ModelSpec, *, width: float) -> None:
    """torchvision ImageNet weights into ``model`` (the classifier is kept only if it has 1000 classes)."""
    if spec.torchvision_name is None or width != 1.0:
        raise UsageError(f"--pretrained needs a torchvision architecture at width 1.0 "
                         f"(one of: {', '.join(n for n, s in REGISTRY.items() if s.torchvision_name)})")
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # URLError, socket errors, hub errors: all mean "not available offline"
        raise MissingDependencyError(
            f"could not fetch torchvision ImageNet weights for {spec.torchvision_name} "
            f"({type(e).__name__}); this machine looks offline",
            hint="train from scratch without --pretrained, or pre-populate $TORCH_HOME/hub/checkpoints",
        ) from None
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------- depth (block pruning)


def residual_stages(model: nn.Module) -> dict[str, nn.Sequential]:
    """The residual stages of a ResNet (``layer1``, ``layer2``, ...: sequences of blocks), in order; empty
    for a model without them (VGG)."""
    from torch import nn

    return {name: m for name, m in model.named_children() if name.startswith("layer") and name[5:].isdigit()
            and isinstance(m, nn.Sequential)}


def stage_depths(model: nn.Module) -> list[int]:
    """Blocks per residual stage."""
    return [len(s) for s in residual_stages(model).values()]


def identity_shortcut(block: nn.Module) -> bool:
    """The block adds its input unchanged: the CIFAR blocks' ``shortcut`` is ``nn.Identity``, torchvision's
    ``downsample`` is ``None`` (and the stride 1, so the shape is kept)."""
    from torch import nn

    if hasattr(block, "shortcut"):
        return isinstance(block.shortcut, nn.Identity)
    if hasattr(block, "downsample"):
        return block.downsample is None
    return False


def set_stage_depths(model: nn.Module, depths: list[int]) -> nn.Module:
    """Keep the first ``depths[i]`` blocks of stage i. A block past a stage's first has the identity shortcut
    and its stage's width in and out, so a stage of the recorded depth takes the kept blocks' weights in order,
    however many blocks were removed between them."""
    from torch import nn

    stages = residual_stages(model)
    full = [len(s) for s in stages.values()]
    if (len(depths) != len(full) or any(isinstance(d, bool) or not isinstance(d, int) for d in depths)
            or any(not 1 <= d <= f for d, f in zip(depths, full, strict=True))):
        raise InputFileError(f"blocks per stage {depths} do not fit this architecture ({len(full)} stages of at "
                             f"most {full} blocks, at least 1 each)")
    for (name, stage), d in zip(stages.items(), depths, strict=True):
        if d < len(stage):
            setattr(model, name, nn.Sequential(*list(stage)[:d]))
    return model


# --------------------------------------------------------------------------------- widths (pruning)


def model_widths(model: nn.Module) -> dict[str, list[int]]:
    """Shape of every conv, linear and batch-norm layer: ``[in, out, groups]``, ``[in, out]``, ``[n]``."""
    from torch import nn

    widths: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = [m.in_channels, m.out_channels, m.groups]
        elif isinstance(m, nn.Linear):
            widths[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.BatchNorm2d):
            widths[name] = [m.num_features]
    return widths


def apply_widths(model: nn.Module, widths: dict[str, list[int]]) -> nn.Module:
    """Replace each layer whose recorded shape differs from ``model``'s by a fresh layer of that shape."""
    from torch import nn

    modules = dict(model.named_modules())
    for name, shape in widths.items():
        m = modules.get(name)
        if m is None:
            raise InputFileError(f"checkpoint records a layer {name!r} that architecture has no place for")
        new: nn.Module | None = None
        if isinstance(m, nn.Conv2d) and [m.in_channels, m.out_channels, m.groups] != shape:
            geometry: dict[str, Any] = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                                        "dilation": m.dilation}
            new = nn.Conv2d(shape[0], shape[1], groups=shape[2], bias=m.bias is not None,
                            padding_mode=m.padding_mode, **geometry)
        elif isinstance(m, nn.Linear) and [m.in_features, m.out_features] != shape:
            new = nn.Linear(shape[0], shape[1], bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d) and [m.num_features] != shape:
            new = nn.BatchNorm2d(shape[0], eps=m.eps, momentum=m.momentum, affine=m.affine,
                                 track_running_stats=m.track_running_stats)
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, attr, new)
    return model


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the ``nn.Module`` a checkpoint describes, in eval mode, on CPU."""
    kwargs = dict(ckpt.get("arch_kwargs", {}))
    blocks = kwargs.get("blocks")
    model = build_model(ckpt["arch"], int(ckpt["num_classes"]), width=float(kwargs.get("width", 1.0)),
                        blocks=None if blocks is None else list(blocks))
    if ckpt.get("widths"):
        apply_widths(model, ckpt["widths"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise InputFileError(f"checkpoint weights do not fit architecture {ckpt['arch']}: {' '.join(first)[:200]}") \
            from None
    return model.eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(p.count_nonzero())
    return total, nonzero


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (conv and linear layers), via forward hooks."""
    import torch
    from torch import nn

    total = 0

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
