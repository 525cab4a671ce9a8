"""DC-AE building blocks as MGVQ uses them, in plain PyTorch (CPU and CUDA).

Module attribute names (`conv`, `norm`, `main`, `op_list`, `context_module`, ...) are the official
EfficientViT ones, so the state-dict keys of the released MGVQ checkpoints load without any renaming.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm2d(nn.Module):
    """RMS over channels at each pixel, then per-channel weight and bias (the official Triton `trms2d`).

    Computed in float32 like the kernel: y = x / sqrt(mean_c(x^2) + eps) * w + b.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rrms = torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)  # (B, 1, H, W)
        y = xf * rrms * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def make_norm(name: str | None, channels: int) -> nn.Module | None:
    if name is None:
        return None
    if name == "bn2d":
        return nn.BatchNorm2d(channels)
    if name == "trms2d":
        return RMSNorm2d(channels)
    raise ValueError(f"unknown norm {name!r}")


def make_act(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}")


class ConvLayer(nn.Module):
    """Same-padded conv, then optional norm and activation."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, groups: int = 1, bias: bool = True,
                 norm: str | None = None, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.norm = make_norm(norm, cout)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """nn.Sequential under the official key prefix `op_list`; an empty one is the identity."""

    def __init__(self, ops: list[nn.Module | None]):
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """main(x) + shortcut(x); the shortcut is the identity unless given (the parameter-free resamplers below)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class ConvPixelUnshuffle(nn.Module):
    """Downsample x2: conv to cout/4 channels, then space-to-depth."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        if cout % 4:
            raise ValueError(f"ConvPixelUnshuffle needs out channels divisible by 4, got {cout}")
        self.conv = ConvLayer(cin, cout // 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self.conv(x), 2)


class ConvPixelShuffle(nn.Module):
    """Upsample x2: conv to 4*cout channels, then depth-to-space."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvLayer(cin, cout * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), 2)


class ChannelAveragingDown(nn.Module):
    """Parameter-free shortcut: space-to-depth by `factor`, then average groups of adjacent channels to cout."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        if (cin * factor**2) % cout:
            raise ValueError(f"cannot average {cin}x{factor}^2 channels down to {cout}")
        self.cout, self.factor = cout, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, self.factor)
        B, C, H, W = x.shape
        return x.view(B, self.cout, C // self.cout, H, W).mean(dim=2)


class ChannelDuplicatingUp(nn.Module):
    """Parameter-free shortcut: repeat each channel, then depth-to-space by `factor`."""

    def __init__(self, cin: int, cout: int, factor: int):
        super().__init__()
        if (cout * factor**2) % cin:
            raise ValueError(f"cannot duplicate {cin} channels up to {cout}x{factor}^2")
        self.repeats, self.factor = cout * factor**2 // cin, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), self.factor)


class ResBlock(nn.Module):
    """conv3x3 (bias) + act, conv3x3 (no bias) + norm; used inside a Residual."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """ReLU linear attention over all pixels, heads of `head_dim` channels (EfficientViT's LiteMLA with no
    multi-scale branch). Like the official code it switches to the equivalent quadratic form when
    H*W <= head_dim, and always runs the attention itself in float32."""

    def __init__(self, channels: int, norm: str, head_dim: int = 32, eps: float = 1e-15):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        inner = channels // head_dim * head_dim
        self.qkv = ConvLayer(channels, 3 * inner, 1, bias=False)
        self.proj = ConvLayer(inner, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            qkv = qkv.float().reshape(B, -1, 3 * self.head_dim, H * W)  # (B, heads, 3d, N)
            q, k, v = qkv.split(self.head_dim, dim=2)  # each (B, heads, d, N)
            q, k = F.relu(q), F.relu(k)
            if H * W > self.head_dim:
                # A row of ones under v makes the last output row the normaliser sum_j k_j . q_i.
                v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, heads, d+1, N)
                out = (v @ k.transpose(-1, -2)) @ q  # (B, heads, d+1, N)
                out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
            else:
                att = k.transpose(-1, -2) @ q  # (B, heads, N_key, N_query)
                att = att / (att.sum(dim=2, keepdim=True) + self.eps)
                out = v @ att  # (B, heads, d, N)
        out = out.reshape(B, -1, H, W).to(x.dtype)
        return self.proj(out)


class GLUMBConv(nn.Module):
    """Inverted bottleneck with a gated depthwise conv: 1x1 to 2*mid (+act), depthwise 3x3, x * act(gate),
    1x1 back (+norm)."""

    def __init__(self, channels: int, norm: str, act: str, expand: int = 4):
        super().__init__()
        mid = channels * expand
        self.glu_act = make_act(act)
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)  # each (B, mid, H, W)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    """Residual LiteMLA (global context) followed by residual GLUMBConv (local mixing): `EViT_GLU`."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, norm))
        self.local_module = Residual(GLUMBConv(channels, norm, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def make_block(block_type: str, channels: int, norm: str, act: str) -> nn.Module:
    if block_type == "ResBlock":
        return Residual(ResBlock(channels, norm, act))
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, norm, act)
    raise ValueError(f"unknown block type {block_type!r}")
