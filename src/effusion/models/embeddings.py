"""Feature networks that need no labels: an ensemble of untrained convolutional nets.

A classifier trained on a folder's few weak labels (six icon contexts, say) learns what
separates those labels and little else: its features cannot tell a coloured blob from an
icon (issue 26: FID 3.5 for blobs, with a 55%-accurate classifier). Random convolutional
features describe edges, textures and their layout without any training, and their
statistics separate real images from blurred, noisy, shuffled or unfinished ones (Naeem et
al. 2020, "Reliable fidelity and diversity metrics", sec. 4.3, use randomly initialised
networks as embeddings for the same reason; Ulyanov et al. 2018 show how much image
structure an untrained conv net captures).

Each member is three 3x3 conv + ReLU stages (halving the resolution between them) with
weights drawn from a fixed seed (He initialisation). Its features are, per stage, every
channel's mean and standard deviation over the image (first- and second-order texture
statistics, as in style losses), plus the last stage pooled to a 2x2 grid (where things
are: a shuffled or off-centre picture differs there). The same seed always gives the same
network, so scores are comparable between runs and machines without a weights file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RANDOM_FEATURES_VERSION = "rf1"  # bump when the architecture or seeding changes


class RandomFeatures(nn.Module):
    """An ensemble of `members` untrained conv nets; images in [-1, 1] (B, C, H, W) ->
    features (B, D), D = members * (2 * sum(widths) + widths[-1] * grid^2)."""

    def __init__(self, in_channels: int, members: int = 2, widths: tuple[int, ...] = (16, 32, 64),
                 grid: int = 2, seed: int = 0):
        super().__init__()
        self.in_channels, self.grid = in_channels, grid
        self.members = nn.ModuleList()
        for m in range(members):
            g = torch.Generator().manual_seed(seed * 1000 + m)
            convs, cin = nn.ModuleList(), in_channels
            for w in widths:
                conv = nn.Conv2d(cin, w, 3, padding=1)
                with torch.no_grad():  # He et al. 2015: keeps the activations' scale per stage
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g)
                                      * (2.0 / (cin * 9)) ** 0.5)
                    conv.bias.zero_()
                convs.append(conv)
                cin = w
            self.members.append(convs)
        self.requires_grad_(False)
        self.dim = members * (2 * sum(widths) + widths[-1] * grid * grid)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for convs in self.members:
            h = x
            for i, conv in enumerate(convs):
                if i:
                    h = F.avg_pool2d(h, 2, ceil_mode=True)
                h = F.relu(conv(h))  # (B, w, H / 2^i, W / 2^i)
                out += [h.mean((2, 3)), h.std((2, 3))]
            out.append(F.adaptive_avg_pool2d(h, self.grid).flatten(1))  # (B, w * grid^2)
        return torch.cat(out, 1)
