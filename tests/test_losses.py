"""DiceBCELoss: values on hand-computed cases, gradients, and fp16/bf16 stability."""
from __future__ import annotations

import math

import pytest
import torch

from cares.losses import DiceBCELoss, dice_bce_loss, soft_dice_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    p = _sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_zero_logits_hand_value():
    # p = 0.5 everywhere; one image of 4 pixels with one lesion pixel.
    # BCE = log 2 for every pixel. Dice = (2*0.5*1 + 1) / (0.5*4 + 1 + 1) = 2 / 4 = 0.5.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    expected = math.log(2) + (1 - 0.5)
    assert dice_bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    weighted = dice_bce_loss(logits, target, dice_weight=2.0, bce_weight=0.5)
    assert weighted.item() == pytest.approx(0.5 * math.log(2) + 2.0 * 0.5, rel=1e-6)


def test_dice_is_per_image_then_mean():
    # Two 1x3 images with different logits; the Dice term is averaged over images, not pooled.
    logits = torch.tensor([[[[2.0, -1.0, 0.5]]], [[[-3.0, 0.0, 4.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[1.0, 0.0, 1.0]]], [[[0.0, 0.0, 0.0]]]], dtype=torch.float64)
    smooth = 1.0
    dice_terms, bce_terms = [], []
    for image_logits, image_target in zip(logits.flatten(1).tolist(), target.flatten(1).tolist()):
        probs = [_sigmoid(x) for x in image_logits]
        intersection = sum(p * t for p, t in zip(probs, image_target))
        dice_terms.append(1 - (2 * intersection + smooth) / (sum(probs) + sum(image_target) + smooth))
        bce_terms += [_bce(x, t) for x, t in zip(image_logits, image_target)]
    expected = sum(bce_terms) / len(bce_terms) + sum(dice_terms) / 2
    assert dice_bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-12)
    assert soft_dice_loss(logits, target).item() == pytest.approx(sum(dice_terms) / 2, rel=1e-12)


def test_module_matches_functional_and_perfect_prediction_is_near_zero():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    module = DiceBCELoss(dice_weight=0.7, bce_weight=1.3, smooth=0.5)
    assert torch.equal(module(logits, target), dice_bce_loss(logits, target, 0.7, 1.3, 0.5))
    confident = (target * 2 - 1) * 50.0  # +50 on lesion, -50 elsewhere
    assert DiceBCELoss()(confident, target).item() < 1e-6


def test_gradcheck_float64():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 1, 4, 5, dtype=torch.float64) > 0.5).to(torch.float64)
    assert torch.autograd.gradcheck(lambda x: dice_bce_loss(x, target, 0.8, 1.2, 1.0), (logits,))
    assert torch.autograd.gradgradcheck(lambda x: dice_bce_loss(x, target), (logits,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_extreme_logits_stay_finite(dtype):
    # Confidently wrong and confidently right logits of +-1e4, the range fp16 overflows exp() in.
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype).view(2, 1, 1, 2).requires_grad_()
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(2, 1, 1, 2)
    loss = DiceBCELoss()(logits, target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # Two of four pixels are wrong by |x| (1e4 rounded to the dtype): mean BCE = 2|x| / 4.
    # Dice: image 0 has p = (1, 0), t = (0, 1): 1 - (0 + 1) / (1 + 1 + 1) = 2/3; image 1 is right: 0.
    magnitude = torch.tensor(1e4, dtype=dtype).item()
    assert loss.item() == pytest.approx(magnitude / 2 + (2 / 3 + 0) / 2, rel=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_matches_float32(dtype, tol):
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 16, 16) * 4
    target = (torch.rand(2, 1, 16, 16) > 0.8).float()
    low = logits.to(dtype)
    # Same loss as float32 on the rounded logits: the computation itself is float32.
    same_in_float32 = dice_bce_loss(low.float(), target).item()
    assert dice_bce_loss(low, target).item() == pytest.approx(same_in_float32, rel=1e-6)
    assert dice_bce_loss(low, target).item() == pytest.approx(dice_bce_loss(logits, target).item(), rel=tol)


def test_bad_input_raises():
    logits = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        dice_bce_loss(logits, torch.zeros(1, 1, 2, 3))
    with pytest.raises(TypeError, match="floating"):
        dice_bce_loss(torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 255"):
        dice_bce_loss(logits, torch.full((1, 1, 2, 2), 255.0))
    with pytest.raises(ValueError, match="smooth"):
        DiceBCELoss(smooth=-1.0)
    with pytest.raises(ValueError, match="batched"):
        dice_bce_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match="Tensor"):
        dice_bce_loss([0.0], torch.zeros(1))


def test_target_check_can_leave_the_per_step_path():
    # The range check reads the target back (a host sync per step on a GPU); training turns it off.
    from cares.losses import DiceBCELoss
    logits, target = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2.0)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        DiceBCELoss()(logits, target)
    assert torch.isfinite(DiceBCELoss(check_target=False)(logits, target))
