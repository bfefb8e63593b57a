"""The three networks: exact sizes, THOP cost, readable names, memory formats, autocast, compile."""

from __future__ import annotations

import pytest
import thop
import torch
from torch import nn

from tune_cifar.config import TrainConfig
from tune_cifar.models import VGGA, ConditionedCNN, SmallCNN, build_model

# Derived by hand in the module docstrings; the VGG-A BN figure adds 2 x (64 + 128 + 2*256 + 4*512) = 5,504.
PARAMS = {
    "small_cnn": 1_070_794,
    "conditioned_cnn": 2_603_274,
    "vgg_a": 9_750_922,
    "vgg_a_bn": 9_756_426,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (SmallCNN(), PARAMS["small_cnn"]),
        (ConditionedCNN(), PARAMS["conditioned_cnn"]),
        (ConditionedCNN(batchnorm=False), PARAMS["conditioned_cnn"] - 2 * (64 + 128 + 256)),
        (VGGA(batchnorm=False), PARAMS["vgg_a"]),
        (VGGA(batchnorm=True), PARAMS["vgg_a_bn"]),
    ],
    ids=["small_cnn", "conditioned_cnn", "conditioned_cnn_no_bn", "vgg_a", "vgg_a_bn"],
)
def test_parameter_counts(model: nn.Module, expected: int) -> None:
    print(f"{type(model).__name__}: {n_params(model):,} parameters")
    assert n_params(model) == expected


def test_small_cnn_thop_cost() -> None:
    # Convs and linears only: THOP counts ReLU, max-pool and biases as zero MACs.
    macs, params = thop.profile(SmallCNN(), inputs=(torch.zeros(1, 3, 32, 32),), verbose=False)
    assert (macs, params) == (6_654_464, 1_070_794)


@pytest.mark.parametrize(
    ("values", "kind", "expected"),
    [
        ({"model": "small_cnn"}, SmallCNN, PARAMS["small_cnn"]),
        ({"model": "conditioned_cnn"}, ConditionedCNN, PARAMS["conditioned_cnn"]),
        ({"model": "vgg_a", "batchnorm": False}, VGGA, PARAMS["vgg_a"]),
        ({"model": "vgg_a", "batchnorm": True}, VGGA, PARAMS["vgg_a_bn"]),
    ],
)
def test_build_model_dispatch(values: dict, kind: type, expected: int) -> None:
    model = build_model(TrainConfig(**values))
    assert type(model) is kind
    assert n_params(model) == expected


def test_build_model_passes_architecture_keys() -> None:
    config = TrainConfig(
        filters=(8, 16, 32), batchnorm=False, activation="leaky_relu", activation_slope=0.2, dropout=0.3
    )
    model = build_model(config)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [8, 16, 32]
    assert model.classifier.fc1.in_features == 32 * 4 * 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}


@pytest.mark.parametrize(("activation", "kind"), [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU)])
def test_each_activation_is_the_one_that_runs(activation: str, kind: type) -> None:
    model = ConditionedCNN(filters=(8, 8, 8), activation=activation)
    activations = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU))]
    assert {type(m) for m in activations} == {kind}
    calls = []
    for module in activations:
        module.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 5  # three conv blocks, two hidden linear layers


@pytest.mark.parametrize("model", [SmallCNN(), ConditionedCNN(), VGGA(True)], ids=["small", "conditioned", "vgg_a"])
def test_parameter_names_are_readable(model: nn.Module) -> None:
    names = [name for name, _ in model.named_parameters()]
    assert names[0] == "features.conv1.weight"
    assert names[-1].startswith("classifier.fc")
    assert not any(part.isdigit() for name in names for part in name.split("."))


MODELS = [SmallCNN, ConditionedCNN, lambda: VGGA(False), lambda: VGGA(True)]
MODEL_IDS = ["small", "conditioned", "vgg_a", "vgg_a_bn"]


@pytest.mark.parametrize("make", MODELS, ids=MODEL_IDS)
def test_channels_last_matches_contiguous(make) -> None:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", MODELS, ids=MODEL_IDS)
def test_autocast_bfloat16_forward_and_backward(make) -> None:
    model = make().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 10) and out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiles_without_graph_breaks() -> None:
    # fullgraph=True raises on any graph break; the eager backend keeps the test fast (no codegen).
    model = ConditionedCNN(filters=(8, 8, 8), activation="elu", dropout=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_kaiming_init_keeps_deep_vgg_logits_alive() -> None:
    # Without BN, PyTorch's default init shrinks how VGG-A's logits vary with the image to ~1e-5
    # (what is left is the biases, the same for every image); Kaiming keeps it (see models.py).
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    assert 0.05 < VGGA(batchnorm=False)(x).std(0).mean().item() < 10.0
    assert VGGA(batchnorm=False, init="torch")(x).std(0).mean().item() < 1e-3


@pytest.mark.parametrize(
    ("model", "default"), [("small_cnn", "torch"), ("conditioned_cnn", "kaiming"), ("vgg_a", "kaiming")]
)
def test_init_per_network_and_what_each_draws(model: str, default: str) -> None:
    """Each network's default init, and what ``torch`` and ``kaiming`` put in a hidden layer:
    PyTorch's uniform ±1/sqrt(fan_in) with a non-zero bias, or Kaiming-normal with a zero bias."""
    assert TrainConfig(model=model).init == default
    torch.manual_seed(0)
    layers = {init: build_model(TrainConfig(model=model, init=init)) for init in ("torch", "kaiming")}
    for init, network in layers.items():
        fc1 = network.classifier.fc1
        bound = fc1.in_features**-0.5
        if init == "torch":
            assert fc1.weight.abs().max() <= bound and fc1.bias.abs().max() > 0
        else:
            assert fc1.weight.abs().max() > bound and torch.count_nonzero(fc1.bias) == 0
            # fan-in normal with ReLU's gain (slope 0.01 for leaky_relu barely changes it): std sqrt(2 / fan_in)
            assert abs(fc1.weight.std().item() * fc1.in_features**0.5 - 2**0.5) < 0.05
        assert network.classifier[-1].weight.abs().max() <= network.classifier[-1].in_features ** -0.5  # output layer
