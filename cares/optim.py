"""Optimisers and learning-rate schedules for training CARes-UNet.

`Ranger` is the optimiser the paper trains with: RAdam (rectified Adam) wrapped in Lookahead, with
gradient centralisation, following lessw2020's Ranger (version 20.4.11,
github.com/lessw2020/Ranger-Deep-Learning-Optimizer, ranger/ranger.py) step for step.
`build_optimizer` / `build_scheduler` turn config names into torch objects.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Ranger",
    "build_optimizer",
    "build_scheduler",
    "OPTIMIZER_NAMES",
    "SCHEDULER_NAMES",
    "ScheduleFactor",
]

OPTIMIZER_NAMES = ("ranger", "adam", "sgd")
SCHEDULER_NAMES = ("constant", "multistep", "cosine")


class Ranger(torch.optim.Optimizer):
    r"""RAdam inside Lookahead, with gradient centralisation (GC).

    For each parameter p with gradient g, at its step t = 1, 2, ... (per-parameter counter):

    1. GC (if ``use_gc``): for weights with more than one dimension (conv and linear; only conv,
       i.e. more than three dimensions, when ``gc_conv_only``), remove the mean over every dim but
       the first:  g <- g - mean(g, dims 1..) . Biases and norm parameters (1-D) are left alone.
    2. Moments:  m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2 .
    3. RAdam's rectification. rho_inf = 2/(1-b2) - 1 ;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t).
    4. Weight decay, decoupled (AdamW-style, as in lessw2020's Ranger): p <- p - lr*wd*p, using the
       weights before this step's update. Decoupled decay shrinks every weight by the same factor
       whatever its gradient history; an L2 term added to g would instead be divided by sqrt(v) and so
       decay rarely-updated weights far more than busy ones.
    5. Update.
       If rho_t > sma_threshold (5, lessw2020's choice; the variance estimate is trusted):
           r_t = sqrt( (1-b2^t) * (rho_t-4)/(rho_inf-4) * (rho_t-2)/rho_t * rho_inf/(rho_inf-2) )
           p <- p - lr * r_t / (1 - b1^t) * m / (sqrt(v) + eps)
       (sqrt(1 - b2^t) is v's bias correction folded into r_t, so eps is added to sqrt(v) itself,
       exactly as lessw2020 does.)
       Otherwise (the first steps: with b2 = 0.999 that is t <= 5) the adaptive denominator is not
       used and the step is bias-corrected momentum SGD, *down* the gradient:
           p <- p - lr * m / (1 - b1^t)
    6. Lookahead: the optimiser keeps slow weights, a copy of p taken before its first step. Every k
       steps (t % k == 0):  slow <- slow + alpha * (p - slow) ;  p <- slow .

    ``state_dict()`` holds, per parameter, ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v) and
    ``slow_buffer`` (the Lookahead slow weights), so a run resumed from it continues bit for bit.
    fp16/bf16 parameters are updated in float32 (moments and slow weights are kept in float32 and
    the result is rounded into the parameter); float32/float64 parameters in their own dtype.

    Args:
        params: parameters or parameter groups (groups may override lr, betas, eps, weight_decay, k,
            alpha, use_gc, gc_conv_only, sma_threshold).
        lr: learning rate (the paper: 5e-4).
        betas: (b1, b2) of the moment averages.
        eps: added to sqrt(v) (1e-5, lessw2020's default).
        weight_decay: decoupled decay factor wd (see step 4).
        k: Lookahead synchronisation period, in steps.
        alpha: Lookahead slow-weight step size in [0, 1].
        use_gc: apply gradient centralisation.
        gc_conv_only: centralise only conv weights (dim > 3) instead of conv and linear (dim > 1).
        sma_threshold: rho_t above which the rectified adaptive step is used.
    """

    def __init__(self, params: Iterable, lr: float = 5e-4, betas: tuple[float, float] = (0.95, 0.999),
                 eps: float = 1e-5, weight_decay: float = 0.0, k: int = 6, alpha: float = 0.5,
                 use_gc: bool = True, gc_conv_only: bool = False, sma_threshold: float = 5.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (Lookahead period) must be an integer >= 1, got {k!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (Lookahead step) must be in [0, 1], got {alpha}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, k=k, alpha=alpha,
                        use_gc=use_gc, gc_conv_only=gc_conv_only, sma_threshold=sma_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                self._update_parameter(param, group)
        return loss

    def _update_parameter(self, param: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        compute_dtype = torch.promote_types(param.dtype, torch.float32)
        state = self.state[param]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=compute_dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=compute_dtype)
            state["slow_buffer"] = param.detach().to(compute_dtype, copy=True)

        grad = param.grad.to(compute_dtype)
        gc_min_dims = 3 if group["gc_conv_only"] else 1
        if group["use_gc"] and grad.dim() > gc_min_dims:
            # Out of place: the caller's param.grad is left as it was.
            grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)

        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)

        beta1_t, beta2_t = beta1 ** step, beta2 ** step
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)

        # fp32/fp64 parameters are updated in place; fp16/bf16 ones through a float32 copy.
        weights = param if param.dtype == compute_dtype else param.to(compute_dtype)
        if group["weight_decay"] != 0:
            weights.add_(weights, alpha=-lr * group["weight_decay"])  # p - lr*wd*p, see step 4
        if rho_t > group["sma_threshold"]:
            rectification = math.sqrt((1.0 - beta2_t) * (rho_t - 4.0) / (rho_inf - 4.0)
                                      * (rho_t - 2.0) / rho_t * rho_inf / (rho_inf - 2.0))
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            weights.addcdiv_(exp_avg, denom, value=-lr * rectification / (1.0 - beta1_t))
        else:
            # Variance not yet tractable: bias-corrected momentum SGD, a step down the gradient.
            weights.add_(exp_avg, alpha=-lr / (1.0 - beta1_t))

        if step % group["k"] == 0:
            slow = state["slow_buffer"]
            slow.add_(weights - slow, alpha=group["alpha"])
            weights.copy_(slow)
        if weights is not param:
            param.copy_(weights)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`; moments and slow weights keep the dtype they were saved in.

        torch's loader casts floating state to the parameter's dtype, which would round the float32
        moments and slow weights of fp16/bf16 parameters and break a bit-exact resume, so the saved
        tensors are copied back over that cast.
        """
        super().load_state_dict(state_dict)
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, copy=True)


def build_optimizer(name: str, params: Iterable, lr: float = 5e-4, weight_decay: float = 1e-4,
                    **kwargs) -> torch.optim.Optimizer:
    """Optimiser by name (OPTIMIZER_NAMES); extra keyword arguments go to its constructor.

    - "ranger": `Ranger` (decoupled weight decay, see its docstring).
    - "adam":   torch.optim.Adam; its weight_decay is the classic L2 term added to the gradient.
    - "sgd":    torch.optim.SGD with momentum 0.9 (override with momentum=...), L2 weight decay.
    """
    if name == "ranger":
        return Ranger(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"optimizer name must be one of {OPTIMIZER_NAMES}, got {name!r}")


class ScheduleFactor:
    """Learning-rate multiplier for epoch e (0-based: the epoch about to be trained).

    Linear warmup first, for e < warmup_epochs:  (e + 1) / (warmup_epochs + 1), reaching 1 at
    e = warmup_epochs. Then, with e' = e - warmup_epochs counted from the end of warmup:
    - constant:  1
    - multistep: gamma ** (number of milestones <= e)   (milestones count from epoch 0, as MultiStepLR)
    - cosine:    0.5 * (1 + cos(pi * e' / (epochs - warmup_epochs))), 1 at e' = 0 and 0 at
                 e = epochs, i.e. after the last epoch has been trained (as CosineAnnealingLR with
                 T_max = epochs - warmup_epochs, eta_min = 0).

    A closed form of e (not a chain of multiplications), so a restored scheduler gives exactly the
    learning rate an uninterrupted one would. A class rather than a lambda so LambdaLR's
    state_dict() can store it.
    """

    def __init__(self, name: str, epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1,
                 warmup_epochs: int = 0):
        self.name = name
        self.epochs = epochs
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        if self.name == "multistep":
            return self.gamma ** sum(1 for milestone in self.milestones if milestone <= epoch)
        if self.name == "cosine":
            progress = min(1.0, (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def default_milestones(epochs: int) -> tuple[int, int]:
    """The paper's 60-epoch schedule (x0.1 at epochs 30 and 50) scaled to `epochs`.

    Rounded half up (so 3 epochs give (2, 3), not Python's banker's (2, 2)) and at least 1.
    """
    return tuple(max(1, math.floor(epochs * fraction + 0.5)) for fraction in (30 / 60, 50 / 60))


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, epochs: int,
                    milestones: Sequence[int] | None = None, gamma: float = 0.1,
                    warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate schedule by name (SCHEDULER_NAMES), to be stepped once per epoch.

    - "constant":  the base lr throughout (the paper's COVID-SemiSeg run: 5e-4 for 1200 epochs).
    - "multistep": x gamma at each milestone (the paper's large-dataset run: 60 epochs, x0.1 at 30
                   and 50). Without `milestones`, (round(epochs*30/60), round(epochs*50/60)).
    - "cosine":    cosine from the base lr to 0 over the epochs after warmup.
    Every schedule starts with `warmup_epochs` of linear warmup (default none); see ScheduleFactor
    for the exact formulas. Returns a LambdaLR; its state_dict() round-trips.
    """
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler name must be one of {SCHEDULER_NAMES}, got {name!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) \
            or not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be an integer in [0, epochs={epochs}), got {warmup_epochs!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if milestones is None:
        milestones = default_milestones(epochs) if name == "multistep" else ()
    else:
        milestones = tuple(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or \
                list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be non-decreasing integers >= 1, got {milestones}")
    factor = ScheduleFactor(name, epochs, milestones, gamma, warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
