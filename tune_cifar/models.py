"""The three CIFAR-10 networks of the study, built from a :class:`TrainConfig`.

Submodules are named (``features.conv1``, ``classifier.fc1``) rather than numbered, because
the training telemetry reports one row per ``named_parameters()`` tensor and a name like
``features.conv3.weight`` is readable in a dashboard where ``features.8.weight`` is not.

Every forward pass is a fixed sequence of layers with no data-dependent Python control flow,
so the models trace under ``torch.compile(fullgraph=True)``, accept ``channels_last`` inputs
(``flatten`` reads the logical NCHW order whatever the memory format) and run under
``torch.autocast``.

Initialisation is the ``init`` key (:func:`initialise`): ``torch`` keeps PyTorch's defaults, as
both reports trained (their recipes set it: ``benchmarks/recipe_fidelity.py`` measured the
second report's recipe 1.2-1.7 points of test accuracy lower with ``kaiming`` than with its own
code, and level with it with ``torch``); ``kaiming`` draws
Kaiming-normal (fan-in) weights and zero biases on every layer followed by a nonlinearity.
PyTorch's default draws weights with a third of the variance a ReLU layer needs to keep its
activations' scale, so without batch norm the signal of an 11-layer VGG-A shrinks about sixfold
in second moment per layer (6^-11 overall) and SGD barely moves it; that is why ``kaiming`` is
the default of the two deeper networks. The output layers keep the default init either way,
so the logits start small and the initial loss is close to log(10).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from torch import Tensor, nn

from tune_cifar.config import TrainConfig
from tune_cifar.data import NUM_CLASSES

IMAGE_SIZE = 32  # CIFAR-10 images are 3x32x32

# VGG-A ("configuration A" of Simonyan & Zisserman 2015): conv widths, "M" a 2x2 max-pool.
VGG_A_LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class SmallCNN(nn.Module):
    """The first report's network: two conv/pool stages and a 256-unit hidden layer.

    1,070,794 parameters and 6,654,464 multiply-accumulates per 3x32x32 image.
    """

    def __init__(self, init: str = "torch") -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 32, 3, padding=1),
                act1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(32, 64, 3, padding=1),
                act2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * 8 * 8, 256),
                act1=nn.ReLU(),
                fc2=nn.Linear(256, NUM_CLASSES),
            )
        )
        initialise(init, [self.features.conv1, self.features.conv2, self.classifier.fc1], "relu", 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class ConditionedCNN(nn.Module):
    """Three conv/[BN]/act/pool blocks and a 512-256-10 head: the searched architecture.

    ``filters`` are the three conv widths. With the defaults it has 2,603,274 parameters.
    """

    def __init__(
        self,
        filters: tuple[int, ...] = (64, 128, 256),
        batchnorm: bool = True,
        activation: str = "relu",
        activation_slope: float = 0.01,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        convs: list[nn.Conv2d] = []
        in_channels = 3
        for i, width in enumerate(filters, start=1):
            convs.append(nn.Conv2d(in_channels, width, 3, padding=1))
            layers[f"conv{i}"] = convs[-1]
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm2d(width)
            layers[f"act{i}"] = make_activation(activation, activation_slope)
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            in_channels = width
        self.features = nn.Sequential(layers)

        side = IMAGE_SIZE // 2 ** len(filters)
        fc1 = nn.Linear(filters[-1] * side * side, 512)
        fc2 = nn.Linear(512, 256)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=fc1,
                act1=make_activation(activation, activation_slope),
                drop1=nn.Dropout(dropout),
                fc2=fc2,
                act2=make_activation(activation, activation_slope),
                drop2=nn.Dropout(dropout),
                fc3=nn.Linear(256, NUM_CLASSES),
            )
        )
        initialise(init, [*convs, fc1, fc2], activation, activation_slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class VGGA(nn.Module):
    """VGG-A (11 weight layers) for 32x32 inputs: five pools leave 512x1x1, so the head is 512-512-512-10.

    9,750,922 parameters without batch norm, 9,756,426 with it (BN follows each conv, whose
    bias is kept so the two variants differ only by the BN layers).
    """

    def __init__(self, batchnorm: bool = True, init: str = "kaiming") -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        convs: list[nn.Conv2d] = []
        in_channels = 3
        n_pools = 0
        for item in VGG_A_LAYERS:
            if isinstance(item, str):
                n_pools += 1
                layers[f"pool{n_pools}"] = nn.MaxPool2d(2)
                continue
            i = len(convs) + 1
            convs.append(nn.Conv2d(in_channels, item, 3, padding=1))
            layers[f"conv{i}"] = convs[-1]
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm2d(item)
            layers[f"act{i}"] = nn.ReLU()
            in_channels = item
        self.features = nn.Sequential(layers)

        fc1 = nn.Linear(in_channels, 512)
        fc2 = nn.Linear(512, 512)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=fc1,
                act1=nn.ReLU(),
                fc2=fc2,
                act2=nn.ReLU(),
                fc3=nn.Linear(512, NUM_CLASSES),
            )
        )
        initialise(init, [*convs, fc1, fc2], "relu", 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def make_activation(name: str, slope: float) -> nn.Module:
    """``relu``, ``leaky_relu`` (negative slope ``slope``) or ``elu``."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(slope)
    if name == "elu":
        return nn.ELU()
    raise ValueError(f"unknown activation {name!r}")


def initialise(init: str, layers: Iterable[nn.Conv2d | nn.Linear], activation: str, slope: float) -> None:
    """Initialise the layers that feed ``activation``: left at PyTorch's defaults for ``torch``
    (weights and biases uniform in ±1/sqrt(fan_in)); Kaiming-normal (fan-in) weights and zero
    biases for ``kaiming``.

    ELU has no entry in :func:`torch.nn.init.calculate_gain`; it is ReLU-like for positive
    inputs, so it takes ReLU's gain.
    """
    if init == "torch":
        return
    if init != "kaiming":
        raise ValueError(f"unknown init {init!r}")
    nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def build_model(config: TrainConfig) -> nn.Module:
    """The network ``config.model`` names, with the architecture keys it takes."""
    if config.model == "small_cnn":
        return SmallCNN(init=config.init)
    if config.model == "conditioned_cnn":
        return ConditionedCNN(
            filters=config.filters,
            batchnorm=config.batchnorm,
            activation=config.activation,
            activation_slope=config.activation_slope,
            dropout=config.dropout,
            init=config.init,
        )
    if config.model == "vgg_a":
        return VGGA(batchnorm=config.batchnorm, init=config.init)
    raise ValueError(f"unknown model {config.model!r}")
