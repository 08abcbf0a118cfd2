"""A feature-fusion upsampler written the way third-party code (FreqFusion, FADE, SIERRA, DLU) uses
mmcv's CARAFE API: imports from mmcv.ops.carafe, mmcv's initialisers, pixel-shuffled softmax masks.

It stands for code we cannot edit: tests/test_compat_mmcv.py runs it unchanged on the
carafe_kernels.compat.mmcv shim, without mmcv installed.
"""
import torch.nn as nn
import torch.nn.functional as F
from mmcv.ops import CARAFEPack
from mmcv.ops.carafe import CARAFENaive, carafe, carafe_naive, normal_init, xavier_init


class FusionUpsampler(nn.Module):
    def __init__(self, hr_channels, lr_channels, compressed_channels=16, up_kernel=5, scale_factor=2,
                 use_naive=False):
        super().__init__()
        self.up_kernel = up_kernel
        self.scale_factor = scale_factor
        self.use_naive = use_naive
        self.lr_compressor = nn.Conv2d(lr_channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels, up_kernel ** 2 * scale_factor ** 2, 3, padding=1)
        self.lr_proj = nn.Conv2d(lr_channels, hr_channels, 1)
        self.refine = CARAFEPack(hr_channels, scale_factor=1, up_kernel=3, compressed_channels=8)
        self.naive = CARAFENaive(up_kernel, 1, scale_factor)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                xavier_init(m, distribution="uniform")
        normal_init(self.content_encoder, std=0.001)

    def kernel(self, hr_feat, lr_feat):
        mask = self.content_encoder(self.lr_compressor(lr_feat))
        mask = F.pixel_shuffle(mask, self.scale_factor)
        b, _, h, w = mask.shape
        mask = F.softmax(mask.view(b, -1, h, w), dim=1)
        return mask

    def forward(self, hr_feat, lr_feat):
        mask = self.kernel(hr_feat, lr_feat)
        lr = self.lr_proj(lr_feat)
        if self.use_naive:
            up = 0.5 * (carafe_naive(lr, mask, self.up_kernel, 1, self.scale_factor) + self.naive(lr, mask))
        else:
            up = carafe(lr, mask, self.up_kernel, 1, self.scale_factor)
        return self.refine(hr_feat + up)
