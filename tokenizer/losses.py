"""Tokenizer training losses: Charbonnier and L2 reconstruction, LPIPS (VGG16), PatchGAN hinge losses.

The VQ and commitment terms come with the quantizer's output (tokenizer/families/mgvq/quantizer.py). LPIPS and the
discriminator follow LlamaGen's and MGVQ's tokenizer recipe (taming-transformers lineage); weights are
only ever read from local files.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean sqrt((x - y)^2 + eps^2): L1-like for large errors, smooth (L2-like) near zero."""
    return torch.sqrt((x.float() - y.float()).square() + eps * eps).mean()


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x.float(), y.float())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean D(fake)."""
    return -logits_fake.float().mean()


def _load_local(path: str | os.PathLike | None, what: str) -> dict:
    if path is None:
        raise ValueError(f"{what} weights are required: pass a local file (nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {path} do not exist (nothing is downloaded: pass a local file)")
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on torchvision's VGG16 features.

    `vgg_weights`: a torchvision `vgg16` state dict (ImageNet weights, `features.*` keys are used);
    `lin_weights`: the LPIPS linear layers (`lin{0..4}.model.1.weight`, the `vgg.pth` LlamaGen and MGVQ ship).
    Both load strictly. Inputs are images in [-1, 1]; the output is the (B,) distance.
    """

    SLICES = (4, 9, 16, 23, 30)  # VGG16 feature indices ending relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_weights: str | os.PathLike | None, lin_weights: str | os.PathLike | None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # torchvision: only LPIPS needs it

        features = make_layers(cfgs["D"])  # torchvision vgg16's `features`, without building its 120M-weight classifier
        vgg = {k.removeprefix("features."): v for k, v in _load_local(vgg_weights, "LPIPS VGG16").items()
               if k.startswith("features.")}
        features.load_state_dict(vgg, strict=True)
        self.features = features[: self.SLICES[-1]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        lin = _load_local(lin_weights, "LPIPS linear-layer")
        want = {f"lin{i}.model.1.weight" for i in range(len(self.CHANNELS))}
        if not want <= set(lin):
            raise KeyError(f"{lin_weights}: LPIPS linear-layer file lacks {sorted(want - set(lin))}")
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed metric: never in training mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, taps, start = (x.float() - self.shift) / self.scale, [], 0
        for end in self.SLICES:
            x = self.features[start:end](x)
            taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
            start = end
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dist = 0
        for lin, a, b in zip(self.lins, self._taps(x), self._taps(y)):
            dist = dist + lin((a - b).square()).mean(dim=(1, 2, 3))  # (B,)
        return dist


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): strided 4x4 convs, BatchNorm, LeakyReLU -> a map of logits."""

    def __init__(self, channels: int = 64, n_layers: int = 3, in_channels: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') logits
