"""Small image classifiers: a worked example of the training recipe, and the feature
network that sample-quality metrics are computed in (no Inception weights offline).

Both map images in [-1, 1] (B, C, H, W) to logits (B, num_classes); `features(x)` is the
penultimate activation, the space FID, KID and precision/recall are measured in.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MLPClassifier(nn.Module):
    """The classic 784-128-64-10 perceptron (for 28x28 gray) with dropout after each hidden
    layer; other sizes change only the input width."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, 64), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(64, num_classes)
        self.feature_dim = 64

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ConvBodyHead(nn.Module):
    """Shared tail of the conv classifiers: `body` gives the 128-d features, then dropout
    and a linear head. (Attribute names are part of saved checkpoints: keep them.)"""

    def _finish(self, body: nn.Sequential, dropout: float, num_classes: int) -> None:
        self.body = body
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(128, num_classes)
        self.feature_dim = 128

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class CNNClassifier(_ConvBodyHead):
    """Two conv stages (32 and 64 channels; BatchNorm, ReLU, 2x2 max-pool), pooled to a 7x7
    grid (a no-op at 28x28; makes any size work), a 128-d feature layer, dropout, the head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, dropout: float):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(), nn.MaxPool2d(2)]

        self._finish(nn.Sequential(
            *conv(in_channels, 32), *conv(32, 64), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128), nn.ReLU()), dropout, num_classes)


class ConvNetClassifier(_ConvBodyHead):
    """Three conv stages of two 3x3 convs each (32, 64, 128 channels; BatchNorm, ReLU; 2x2
    max-pool between stages), global average pooling to a 128-d feature, dropout, the head.

    Global pooling makes the features translation-invariant, which objects at random
    places and rotations (the `shapes` source, photos) need: on shapes at 32 px the `cnn`
    recipe reaches ~81%, this network 100% with the same recipe and epochs."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, dropout: float):
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self._finish(nn.Sequential(*stage(in_channels, 32), nn.MaxPool2d(2), *stage(32, 64),
                                   nn.MaxPool2d(2), *stage(64, 128), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten()), dropout, num_classes)


CLASSIFIERS = {"mlp": MLPClassifier, "cnn": CNNClassifier, "convnet": ConvNetClassifier}
