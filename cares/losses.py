"""Training loss for CARes-UNet: binary cross-entropy plus soft Dice on lesion logits.

    loss = bce_weight * BCEWithLogits(logits, target)            (mean over every pixel)
         + dice_weight * mean_n [ 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth) ]

with p = sigmoid(logits), the sums taken over all pixels of image n (channel, height, width) and the
Dice term averaged over the batch. BCE drives every pixel towards its label; the Dice term weighs the
small lesion against the large background, which BCE alone under-weights in CT slices where lesions
cover a few percent of the image.

Mixed precision: fp16/bf16 inputs are cast to float32 before anything is computed, so logits from
autocast cannot overflow in exp() or lose the sums to rounding; logits of +-1e4 in fp16 give a finite
loss and finite gradients. float32 and float64 inputs are computed in their own dtype (float64 keeps
gradcheck exact). The loss is a scalar in that compute dtype (float32 for fp16/bf16 input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiceBCELoss", "dice_bce_loss", "soft_dice_loss"]


def _check_pair(logits: Tensor, target: Tensor, check_values: bool = True) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"logits and target must be torch.Tensors, got {type(logits).__name__} and "
                        f"{type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be batched, shape (N, 1, H, W) or (N, ...), got shape "
                         f"{tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape "
                         f"{tuple(logits.shape)}")
    # The value check reads the tensor back (a host sync on a GPU): callers on a per-step path whose
    # targets are valid by construction turn it off (check_target=False).
    if check_values and target.numel() > 0:
        low, high = torch.aminmax(target.detach().float())
        if low.item() < 0 or high.item() > 1:
            raise ValueError(f"target values must lie in [0, 1] (a 0/1 mask), got min "
                             f"{low.item():g} and max {high.item():g}")


def _check_weights(dice_weight: float, bce_weight: float, smooth: float) -> None:
    for name, value in (("dice_weight", dice_weight), ("bce_weight", bce_weight), ("smooth", smooth)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value}")


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss, computed per image and averaged over the batch.

    logits, target: (N, ...) with the same shape; target in [0, 1]. Returns the scalar
    mean_n [1 - (2 * sum(p*t) + smooth) / (sum(p) + sum(t) + smooth)], p = sigmoid(logits).
    `smooth` keeps an empty prediction on an empty mask at loss 0 instead of 0/0.
    """
    _check_pair(logits, target)
    _check_weights(1.0, 1.0, smooth)
    logits_c, target_c = _to_compute_dtype(logits, target)
    return _soft_dice(logits_c, target_c, smooth)


def _to_compute_dtype(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Cast to at least float32: fp16/bf16 -> float32, float32/float64 unchanged."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(compute_dtype), target.to(compute_dtype)


def _soft_dice(logits: Tensor, target: Tensor, smooth: float) -> Tensor:
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    dice_per_image = (2.0 * intersection + smooth) / (total + smooth)
    return (1.0 - dice_per_image).mean()


def dice_bce_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0,
                  smooth: float = 1.0, check_target: bool = True) -> Tensor:
    """bce_weight * mean BCE-with-logits + dice_weight * soft Dice loss (see the module docstring).

    logits: (N, 1, H, W) (any float dtype); target: same shape, values in {0, 1} (soft labels in
    [0, 1] are accepted). Returns a scalar tensor (float32, or float64 for float64 input).
    check_target=False skips the check that target lies in [0, 1], which reads it back to the host.
    """
    _check_pair(logits, target, check_target)
    _check_weights(dice_weight, bce_weight, smooth)
    # At least float32 internally: BCE-with-logits and sigmoid are stable for any finite logit in
    # fp32, while fp16 sums over a 256x256 image would round badly.
    logits_c, target_c = _to_compute_dtype(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits_c, target_c, reduction="mean")
    return bce_weight * bce + dice_weight * _soft_dice(logits_c, target_c, smooth)


class DiceBCELoss(nn.Module):
    """nn.Module wrapper of `dice_bce_loss`: forward(logits, target) -> scalar tensor."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0,
                 check_target: bool = True):
        super().__init__()
        _check_weights(dice_weight, bce_weight, smooth)
        self.check_target = bool(check_target)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return dice_bce_loss(logits, target, self.dice_weight, self.bce_weight, self.smooth, self.check_target)

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, smooth={self.smooth}"
