"""The model registry: names, shapes, torchvision compatibility, width scaling, pruned-width rebuilds."""

from __future__ import annotations

import pytest
import torch

from resopt.errors import UsageError
from resopt.models import (
    REGISTRY,
    apply_widths,
    build_model,
    count_macs,
    count_params,
    get_spec,
    model_from_checkpoint,
    model_widths,
)


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_arch_builds_and_runs(arch: str) -> None:
    spec = get_spec(arch)
    model = build_model(arch, 10, width=0.25).eval()
    size = 32 if spec.default_input_size == 32 else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)


def test_paper_parameter_counts() -> None:
    # He et al. 2016 report 0.27M / 0.46M / 0.85M; option-B shortcuts add a few thousand.
    assert 0.27e6 < count_params(build_model("resnet20", 10))[0] < 0.28e6
    assert 0.46e6 < count_params(build_model("resnet32", 10))[0] < 0.47e6
    assert 0.85e6 < count_params(build_model("resnet56", 10))[0] < 0.86e6
    assert count_params(build_model("resnet18", 1000))[0] == 11_689_512  # torchvision's number


def test_torchvision_state_dicts_load_unchanged() -> None:
    import torchvision

    for name in ("resnet18", "resnet50"):
        tv = torchvision.models.get_model(name, num_classes=1000)
        ours = build_model(name, 1000)
        ours.load_state_dict(tv.state_dict(), strict=True)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(ours.eval()(x), tv.eval()(x), atol=1e-5)


def test_macs_match_known_values() -> None:
    # torchvision's ResNet-18 at 224: 1.814 GMACs (documented as 1.81 GFLOPS in its model table).
    assert abs(count_macs(build_model("resnet18", 1000), 224) / 1e9 - 1.814) < 0.01
    assert 40e6 < count_macs(build_model("resnet20", 10), 32) < 42e6


def test_unknown_arch_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="unknown architecture 'resnet19'.*resnet20"):
        build_model("resnet19", 10)


def test_bad_width_and_classes() -> None:
    with pytest.raises(UsageError, match="width"):
        build_model("resnet20", 10, width=0.0)
    with pytest.raises(UsageError, match="num_classes"):
        build_model("resnet20", 1)


def test_pretrained_fails_clearly_for_non_torchvision_arch() -> None:
    with pytest.raises(UsageError, match="--pretrained needs a torchvision architecture"):
        build_model("resnet20", 10, pretrained=True)


def test_widths_rebuild_a_shrunk_model() -> None:
    model = build_model("resnet20", 10, width=0.5)
    widths = model_widths(model)
    # Shrink the first block's inner conv by hand, as a structured prune would.
    widths["layer1.0.conv1"] = [8, 5, 1]
    widths["layer1.0.bn1"] = [5]
    widths["layer1.0.conv2"] = [5, 8, 1]
    shrunk = apply_widths(build_model("resnet20", 10, width=0.5), widths)
    assert shrunk.layer1[0].conv1.out_channels == 5
    ckpt = {"arch": "resnet20", "arch_kwargs": {"width": 0.5}, "num_classes": 10, "widths": widths,
            "state_dict": shrunk.state_dict()}
    rebuilt = model_from_checkpoint(ckpt)
    assert count_params(rebuilt) == count_params(shrunk)
    assert count_params(rebuilt)[0] < count_params(model)[0]
