"""Ranger against hand-computed float64 steps, bit-exact resume, build_optimizer and schedules."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from cares.optim import OPTIMIZER_NAMES, SCHEDULER_NAMES, Ranger, build_optimizer, build_scheduler


def _ranger_reference(p0, grads, *, lr, betas, eps, wd, k, alpha):
    """Ranger on a list of scalars (no GC: a 1-D parameter), one python-float loop per element.

    Written from the formulas in the Ranger docstring; returns the parameter after each step.
    """
    beta1, beta2 = betas
    p = list(p0)
    slow = list(p0)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    history = []
    rho_inf = 2 / (1 - beta2) - 1
    for t, g in enumerate(grads, start=1):
        rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
        for i in range(len(p)):
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            p[i] = p[i] - lr * wd * p[i]
            if rho_t > 5:
                r_t = math.sqrt((1 - beta2 ** t) * (rho_t - 4) / (rho_inf - 4) * (rho_t - 2) / rho_t
                                * rho_inf / (rho_inf - 2))
                p[i] -= lr * r_t / (1 - beta1 ** t) * m[i] / (math.sqrt(v[i]) + eps)
            else:
                p[i] -= lr * m[i] / (1 - beta1 ** t)
            if t % k == 0:
                slow[i] += alpha * (p[i] - slow[i])
                p[i] = slow[i]
        history.append(list(p))
    return history


def _run_ranger(p0, grads, **kwargs):
    param = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    optimizer = Ranger([param], **kwargs)
    history = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        history.append(param.detach().clone())
    return history, optimizer


def test_first_step_is_sgd_down_the_gradient():
    # rho_1 = 1 <= 5: p1 = p0 - lr * m1 / (1 - b1) = p0 - lr * g exactly (m1 = (1 - b1) g).
    p0, g = [1.0, -2.0, 0.5], [0.3, -0.4, 0.0]
    history, _ = _run_ranger(p0, [g], lr=0.1, use_gc=False)
    expected = torch.tensor([1.0 - 0.03, -2.0 + 0.04, 0.5], dtype=torch.float64)
    torch.testing.assert_close(history[0], expected, rtol=0, atol=1e-15)
    # Second step, still un-rectified: m2 = b1 m1 + (1 - b1) g2, p2 = p1 - lr m2 / (1 - b1^2).
    g2 = [0.1, 0.1, -1.0]
    history, _ = _run_ranger(p0, [g, g2], lr=0.1, use_gc=False)
    m2 = [0.95 * 0.05 * a + 0.05 * b for a, b in zip(g, g2)]
    expected2 = [p - 0.1 * m / (1 - 0.95 ** 2) for p, m in zip(expected.tolist(), m2)]
    torch.testing.assert_close(history[1], torch.tensor(expected2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_rectification_switches_on_at_step_six():
    # With b2 = 0.999: rho_5 = 4.990 (SGD branch) and rho_6 = 5.985 > 5 (rectified branch).
    rho = lambda t: 1999 - 2 * t * 0.999 ** t / (1 - 0.999 ** t)  # noqa: E731
    assert rho(1) == pytest.approx(1.0)
    assert rho(5) < 5 < rho(6)
    # A constant gradient g: after step 6 the rectified update is
    # lr * r_6 / (1 - b1^6) * m_6 / (sqrt(v_6) + eps) with m_6 = (1 - b1^6) g, v_6 = (1 - b2^6) g^2.
    lr, g = 0.01, 2.0
    history, _ = _run_ranger([0.0], [[g]] * 6, lr=lr, k=100, use_gc=False)
    r6 = math.sqrt((1 - 0.999 ** 6) * (rho(6) - 4) / 1995 * (rho(6) - 2) / rho(6) * 1999 / 1997)
    step6 = lr * r6 * g / (math.sqrt(1 - 0.999 ** 6) * g + 1e-5)
    assert history[5].item() - history[4].item() == pytest.approx(-step6, rel=1e-12)
    # Steps 1-5 are SGD on the bias-corrected momentum, which is g itself: each moves by -lr * g.
    for t in range(5):
        assert history[t].item() == pytest.approx(-lr * g * (t + 1), rel=1e-12)


def test_matches_reference_over_lookahead_syncs_with_weight_decay():
    torch.manual_seed(0)
    p0 = torch.randn(5, dtype=torch.float64).tolist()
    grads = [torch.randn(5, dtype=torch.float64).tolist() for _ in range(14)]
    config = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-5, wd=0.1, k=4, alpha=0.3)
    expected = _ranger_reference(p0, grads, **config)
    history, _ = _run_ranger(p0, grads, lr=0.05, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.1, k=4,
                             alpha=0.3, use_gc=False)
    for step, (got, want) in enumerate(zip(history, expected), start=1):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=1e-15,
                                   msg=f"step {step}")


def test_lookahead_sync_by_hand():
    # k = 2, alpha = 0.5, lr = 1, gradient 1 on p0 = 0: fast steps are SGD by -1 each (bias-corrected
    # momentum of a constant gradient is the gradient), so fast = -2 after step 2, and the sync gives
    # slow = 0 + 0.5 * (-2 - 0) = -1, p = -1. Step 3: -2; step 4: fast -3, slow = -1 + 0.5 * (-3 + 1) = -2.
    history, optimizer = _run_ranger([0.0], [[1.0]] * 4, lr=1.0, k=2, alpha=0.5, use_gc=False)
    assert [h.item() for h in history] == pytest.approx([-1.0, -1.0, -2.0, -2.0], abs=1e-12)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["step"] == 4
    assert state["slow_buffer"].item() == pytest.approx(-2.0, abs=1e-12)


def test_weight_decay_is_decoupled():
    # Zero gradient: only decay acts, p <- p - lr * wd * p, independent of the moments.
    history, _ = _run_ranger([2.0, -4.0], [[0.0, 0.0]], lr=0.1, weight_decay=0.5, use_gc=False)
    torch.testing.assert_close(history[0], torch.tensor([1.9, -3.8], dtype=torch.float64), rtol=0, atol=1e-15)


def _first_step_update(shape, grad, **kwargs):
    param = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    param.grad = grad.clone()
    Ranger([param], lr=1.0, **kwargs).step()
    return -param.detach()  # first step: p1 - p0 = -lr * (centred) g


def test_gradient_centralisation():
    torch.manual_seed(3)
    grad2d = torch.randn(3, 4, dtype=torch.float64) + 5.0
    centred = grad2d - grad2d.mean(dim=1, keepdim=True)
    torch.testing.assert_close(_first_step_update((3, 4), grad2d), centred, rtol=0, atol=1e-14)
    # Each output unit's update sums to zero.
    row_sums = _first_step_update((3, 4), grad2d).sum(dim=1)
    torch.testing.assert_close(row_sums, torch.zeros(3, dtype=torch.float64))
    # Off, or conv-only on a linear weight, or a 1-D bias: the raw gradient.
    torch.testing.assert_close(_first_step_update((3, 4), grad2d, use_gc=False), grad2d, rtol=0, atol=1e-14)
    conv_only = _first_step_update((3, 4), grad2d, gc_conv_only=True)
    torch.testing.assert_close(conv_only, grad2d, rtol=0, atol=1e-14)
    bias_grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(_first_step_update((3,), bias_grad), bias_grad, rtol=0, atol=1e-14)
    # A conv weight is centred over (in_channels, kh, kw) per output channel.
    grad4d = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(_first_step_update((2, 3, 3, 3), grad4d, gc_conv_only=True),
                               grad4d - grad4d.mean(dim=(1, 2, 3), keepdim=True), rtol=0, atol=1e-14)


def test_step_leaves_the_gradient_alone():
    param = nn.Parameter(torch.zeros(2, 3))
    param.grad = torch.arange(6.0).view(2, 3)
    Ranger([param]).step()
    assert torch.equal(param.grad, torch.arange(6.0).view(2, 3))


def _tiny_model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2)).to(dtype)


def _train(model, optimizer, steps, start, dtype):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(1000 + step)
        inputs = torch.randn(4, 1, 4, 4, generator=generator).to(dtype)
        targets = torch.randn(4, 2, generator=generator).to(dtype)
        optimizer.zero_grad()
        loss = ((model(inputs) - targets) ** 2).mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(dtype):
    # 4 steps, save, rebuild, load, 9 more (crossing Lookahead syncs at 6 and 12) == 13 straight.
    config = dict(lr=1e-2, weight_decay=1e-2, k=6)
    reference = _tiny_model(0, dtype)
    reference_opt = Ranger(reference.parameters(), **config)
    _train(reference, reference_opt, 13, 0, dtype)

    first = _tiny_model(0, dtype)
    first_opt = Ranger(first.parameters(), **config)
    _train(first, first_opt, 4, 0, dtype)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    state = checkpoint["optimizer"]["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "slow_buffer"} and state["step"] == 4

    resumed = _tiny_model(1, dtype)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = Ranger(resumed.parameters(), **config)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, 9, 4, dtype)
    for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(got, want), name


def test_ranger_rejects_bad_arguments():
    params = [nn.Parameter(torch.zeros(1))]
    for kwargs, word in [(dict(lr=0), "lr"), (dict(k=0), "k"), (dict(alpha=1.5), "alpha"),
                         (dict(betas=(1.0, 0.9)), "betas"), (dict(eps=0), "eps"),
                         (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=word):
            Ranger(params, **kwargs)


def test_build_optimizer():
    assert OPTIMIZER_NAMES == ("ranger", "adam", "sgd")
    model = nn.Linear(2, 2)
    ranger = build_optimizer("ranger", model.parameters())
    assert isinstance(ranger, Ranger)
    assert ranger.defaults["lr"] == 5e-4 and ranger.defaults["weight_decay"] == 1e-4
    adam = build_optimizer("adam", model.parameters(), lr=1e-3, weight_decay=0.0)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3
    sgd = build_optimizer("sgd", model.parameters())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert build_optimizer("sgd", model.parameters(), momentum=0.5).defaults["momentum"] == 0.5
    assert build_optimizer("ranger", model.parameters(), k=3).defaults["k"] == 3
    with pytest.raises(ValueError, match="'lamb'"):
        build_optimizer("lamb", model.parameters())


def _lrs(name, epochs, base_lr=5e-4, **kwargs):
    """Learning rate used in each epoch 0..epochs-1, then the one after the last step."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_scheduler(name, optimizer, epochs=epochs, **kwargs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_multistep_paper_schedule():
    assert SCHEDULER_NAMES == ("constant", "multistep", "cosine")
    lrs = _lrs("multistep", 60)
    assert lrs[:60] == pytest.approx([5e-4] * 30 + [5e-5] * 20 + [5e-6] * 10, rel=1e-12)
    # Default milestones scale with epochs: 120 epochs -> 60, 100.
    lrs = _lrs("multistep", 120)
    assert lrs[59] == pytest.approx(5e-4) and lrs[60] == pytest.approx(5e-5)
    assert lrs[99] == pytest.approx(5e-5) and lrs[100] == pytest.approx(5e-6)
    lrs = _lrs("multistep", 10, milestones=[2, 4], gamma=0.5, base_lr=1.0)
    assert lrs[:10] == pytest.approx([1, 1, 0.5, 0.5] + [0.25] * 6)


def test_constant_and_warmup():
    assert _lrs("constant", 5) == pytest.approx([5e-4] * 6)
    # Linear warmup: (e + 1) / (w + 1) for e < w, then the schedule.
    assert _lrs("constant", 5, warmup_epochs=3, base_lr=1.0)[:5] == pytest.approx([0.25, 0.5, 0.75, 1, 1])


def test_cosine_endpoints():
    lrs = _lrs("cosine", 10, base_lr=1.0)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.5)  # halfway: 0.5 * (1 + cos(pi/2))
    assert lrs[10] == pytest.approx(0.0, abs=1e-15)  # after the last epoch
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    warm = _lrs("cosine", 12, base_lr=1.0, warmup_epochs=2)
    assert warm[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert warm[7] == pytest.approx(0.5) and warm[12] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_state_round_trip(name):
    def make():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(name, optimizer, epochs=20, warmup_epochs=2)

    optimizer, scheduler = make()
    straight = []
    for _ in range(20):
        straight.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = make()
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    saved = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)  # weights_only=True: the state holds plain values only
    optimizer, scheduler = make()
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    resumed = []
    for _ in range(7, 20):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == straight[7:]


def test_scheduler_rejects_bad_arguments():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="'step'"):
        build_scheduler("step", optimizer, epochs=10)
    with pytest.raises(ValueError, match="epochs"):
        build_scheduler("cosine", optimizer, epochs=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler("cosine", optimizer, epochs=5, warmup_epochs=5)
    with pytest.raises(ValueError, match="milestones"):
        build_scheduler("multistep", optimizer, epochs=10, milestones=[5, 2])
