"""Every autodiff mode through every backend, against the float64 reference (which PyTorch
differentiates itself): forward mode (torch.autograd.forward_ad, torch.func.jvp), the torch.func
transforms (grad, vjp, jacrev, jacfwd, vmap), double backward and forward-over-reverse. The native
backends used to give a silently zero tangent here (carafe_kernels/ops.py says why).

The Triton cases run under the interpreter in their own process:
    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_autodiff.py
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import backend_cases, make_inputs

from carafe_kernels import CARAFEPack, backend_status, carafe, carafe_fused
from carafe_kernels.reference import normalize_mask_logits, normalize_mask_logits_jvp

CASES = backend_cases(include_triton_interpret=True)
OPS = [pytest.param(False, id="plain"), pytest.param(True, id="fused")]
SHAPE = (2, 4, 3, 4, 3, 2, 2)  # N, C, H, W, k, G, s: small enough for jacobians and the interpreter


def _dtype(backend: str) -> torch.dtype:
    """float64 where the backend computes in it (an exact comparison), else float32 (Triton)."""
    return torch.float64 if backend != "triton" else torch.float32


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def _fn(fused: bool, backend: str):
    op = carafe_fused if fused else carafe
    _, _, _, _, k, G, s = SHAPE
    return lambda f, m: op(f, m, k, G, s, backend=backend)


def _inputs(fused: bool, device: str, dtype, seed: int = 0):
    features, second = make_inputs(*SHAPE, fused=fused, dtype=torch.float64, seed=seed)
    return features.to(device, dtype), second.to(device, dtype)


def _check(got, expected, dtype):
    torch.testing.assert_close(got.detach().cpu().double(), expected.detach().cpu().double(), **_tol(dtype))


@pytest.mark.parametrize("fused", OPS)
@pytest.mark.parametrize("backend, device", CASES)
def test_jvp_matches_the_reference(backend, device, fused):
    dtype = _dtype(backend)
    primals = _inputs(fused, device, dtype)
    tangents = _inputs(fused, device, dtype, seed=1)
    out, tangent = torch.func.jvp(_fn(fused, backend), primals, tangents)
    ref_primals = tuple(p.cpu().double() for p in primals)
    ref_tangents = tuple(t.cpu().double() for t in tangents)
    ref_out, ref_tangent = torch.func.jvp(_fn(fused, "reference"), ref_primals, ref_tangents)
    assert ref_tangent.abs().max() > 0.1
    _check(out, ref_out, dtype)
    _check(tangent, ref_tangent, dtype)
    # one tangent at a time (the other input is a constant)
    for i in range(2):
        f = (lambda x: _fn(fused, backend)(x, primals[1])) if i == 0 else (lambda x: _fn(fused, backend)(primals[0], x))
        f_ref = ((lambda x: _fn(fused, "reference")(x, ref_primals[1])) if i == 0
                 else (lambda x: _fn(fused, "reference")(ref_primals[0], x)))
        _check(torch.func.jvp(f, (primals[i],), (tangents[i],))[1],
               torch.func.jvp(f_ref, (ref_primals[i],), (ref_tangents[i],))[1], dtype)


@pytest.mark.parametrize("fused", OPS)
@pytest.mark.parametrize("backend, device", CASES)
def test_forward_ad_dual_tensors(backend, device, fused):
    """torch.autograd.forward_ad: the output carries the tangent (it was None)."""
    dtype = _dtype(backend)
    primals = _inputs(fused, device, dtype)
    tangents = _inputs(fused, device, dtype, seed=1)
    with fwAD.dual_level():
        out = _fn(fused, backend)(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    expected = torch.func.jvp(_fn(fused, "reference"), tuple(p.cpu().double() for p in primals),
                              tuple(t.cpu().double() for t in tangents))[1]
    _check(tangent, expected, dtype)


@pytest.mark.parametrize("fused", OPS)
@pytest.mark.parametrize("backend, device", CASES)
def test_func_transforms_match_the_reference(backend, device, fused):
    """torch.func.grad, vjp, jacrev, jacfwd and vmap (they raised "must override the setup_context
    staticmethod" or gave zeros)."""
    dtype = _dtype(backend)
    features, second = _inputs(fused, device, dtype)
    f64, s64 = features.cpu().double(), second.cpu().double()
    fn, ref = _fn(fused, backend), _fn(fused, "reference")
    weight = torch.randn(_fn(fused, "reference")(f64, s64).shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))

    def loss(g):
        return lambda f, m: (g(f, m) * weight.to(f)).sum()

    for got, expected in zip(torch.func.grad(loss(fn), argnums=(0, 1))(features, second),
                             torch.func.grad(loss(ref), argnums=(0, 1))(f64, s64)):
        _check(got, expected, dtype)
    out, vjp_fn = torch.func.vjp(fn, features, second)
    ref_out, ref_vjp_fn = torch.func.vjp(ref, f64, s64)
    _check(out, ref_out, dtype)
    for got, expected in zip(vjp_fn(weight.to(out)), ref_vjp_fn(weight)):
        _check(got, expected, dtype)
    small = make_inputs(1, 2, 2, 2, 3, 1, 2, fused=fused, dtype=torch.float64)  # jacobians: keep them small
    small_dev = tuple(t.to(device, dtype) for t in small)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        got = jac(lambda f, m: _small(fused, backend)(f, m), argnums=(0, 1))(*small_dev)
        expected = jac(lambda f, m: _small(fused, "reference")(f, m), argnums=(0, 1))(*small)
        for g, e in zip(got, expected):
            _check(g, e, dtype)
    batched = torch.stack([features, features.flip(0)]), torch.stack([second, second.flip(0)])
    with warnings.catch_warnings():
        # the op's vmap rule folds the vmapped dimension into the batch: no per-sample fallback loop
        warnings.filterwarnings("error", message=".*performance drop.*")
        got = torch.vmap(fn)(*batched)
    _check(got, torch.vmap(ref)(*(b.cpu().double() for b in batched)), dtype)
    got = torch.vmap(fn, in_dims=(0, None))(batched[0], second)
    _check(got, torch.vmap(ref, in_dims=(0, None))(batched[0].cpu().double(), s64), dtype)


def _small(fused, backend):
    op = carafe_fused if fused else carafe
    return lambda f, m: op(f, m, 3, 1, 2, backend=backend)


@pytest.mark.parametrize("backend, device", CASES)
def test_double_backward_and_hessian_of_the_plain_op(backend, device):
    """The plain op's backward is bilinear, so it is differentiable with the ops themselves: double
    backward (create_graph) and forward-over-reverse (torch.func.hessian) match the reference."""
    dtype = _dtype(backend)
    features, masks = _inputs(False, device, dtype)
    f64, m64 = features.cpu().double(), masks.cpu().double()

    def second_order(fn, f, m):
        f, m = f.clone().requires_grad_(True), m.clone().requires_grad_(True)
        out = fn(f, m)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
        gf, gm = torch.autograd.grad((out * out * weight).sum(), (f, m), create_graph=True)
        return torch.autograd.grad((gf * gf).sum() + (gm * f.mean()).sum(), (f, m))

    for got, expected in zip(second_order(_fn(False, backend), features, masks),
                             second_order(_fn(False, "reference"), f64, m64)):
        _check(got, expected, dtype)
    small = make_inputs(1, 2, 2, 2, 3, 1, 2, fused=False, dtype=torch.float64)
    small_dev = tuple(t.to(device, dtype) for t in small)

    def scalar(fn):
        return lambda f, m: (fn(f, m) ** 2).sum()

    got = torch.func.hessian(scalar(_small(False, backend)), argnums=(0, 1))(*small_dev)
    expected = torch.func.hessian(scalar(_small(False, "reference")), argnums=(0, 1))(*small)
    for row_got, row_expected in zip(got, expected):
        for g, e in zip(row_got, row_expected):
            _check(g, e, dtype)


@pytest.mark.parametrize("backend, device", [c for c in CASES if c.values[0] != "reference"])
def test_second_order_through_the_fused_op_is_refused(backend, device):
    """No silent wrong answer: the fused backward has no derivative, and says so."""
    dtype = _dtype(backend)
    features, logits = (t.requires_grad_(True) for t in _inputs(True, device, dtype))
    out = _fn(True, backend)(features, logits)
    grads = torch.autograd.grad(out.square().sum(), (features, logits), create_graph=True)
    with pytest.raises(NotImplementedError, match="through the fused CARAFE op are not supported"):
        torch.autograd.grad(grads[0].sum() + grads[1].sum(), (features, logits))
    with pytest.raises(NotImplementedError, match="through the fused CARAFE op are not supported"):
        torch.func.hessian(lambda f: _fn(True, backend)(f, logits.detach()).square().sum())(features.detach())


@pytest.mark.parametrize("backend, device", CASES)
def test_carafepack_jvp(backend, device):
    """The issue's CARAFEPack case: its jvp was 0 (finite differences: nonzero)."""
    dtype = _dtype(backend)
    torch.manual_seed(0)
    pack = CARAFEPack(4, scale_factor=2, up_kernel=3, compressed_channels=8, backend=backend).to(device, dtype)
    ref = CARAFEPack(4, scale_factor=2, up_kernel=3, compressed_channels=8, backend="reference").double()
    ref.load_state_dict({k: v.double().cpu() for k, v in pack.state_dict().items()})
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    dx = torch.randn_like(x)
    _, tangent = torch.func.jvp(pack, (x.to(device, dtype),), (dx.to(device, dtype),))
    _, expected = torch.func.jvp(ref, (x,), (dx,))
    assert expected.abs().max() > 0.1
    _check(tangent, expected, dtype)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(pack(fwAD.make_dual(x.to(device, dtype), dx.to(device, dtype)))).tangent
    _check(tangent, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_normalize_mask_logits_jvp(dtype):
    logits, tangent = (make_inputs(1, 2, 3, 2, 3, 2, 2, fused=True, dtype=torch.float64, seed=i)[1] for i in (0, 1))
    expected = torch.func.jvp(lambda x: normalize_mask_logits(x, 3, 2, 2), (logits,), (tangent,))[1]
    got = normalize_mask_logits_jvp(logits.to(dtype), tangent.to(dtype), 3, 2, 2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, **(_tol(dtype) if dtype != torch.bfloat16
                                                           else dict(rtol=2e-2, atol=2e-2)))


def test_direct_op_calls_under_torch_func_are_refused_clearly():
    """torch.ops.carafe_kernels.* called directly cannot meet a torch.func transform (see ops.py):
    a clear error, not PyTorch's internal one, not a zero."""
    if backend_status()["cpu"] is not None:
        pytest.skip(f"native ops unavailable: {backend_status()['cpu']}")
    features, masks = _inputs(False, "cpu", torch.float64)
    op = torch.ops.carafe_kernels.carafe
    for transform in (lambda f: torch.func.grad(lambda x: f(x).sum())(features),
                      lambda f: torch.func.jvp(f, (features,), (features,))):
        with pytest.raises(NotImplementedError, match="call carafe_kernels.carafe / carafe_fused"):
            transform(lambda x: op(x, masks, 3, 2, 2))
    # forward mode and reverse mode on the op itself work
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(op(fwAD.make_dual(features, features), masks, 3, 2, 2)).tangent
    torch.testing.assert_close(tangent, op(features, masks, 3, 2, 2))  # linear in the features


@pytest.mark.parametrize("backend, device", [c for c in CASES if c.values[0] == "triton"])
def test_triton_rules_load_without_warnings(backend, device):
    """The Triton ops' own autograd kernel is replaced on purpose: PyTorch's override warning is not
    shown to users (fresh interpreter, the environment inherited)."""
    code = ("import carafe_kernels.triton as t\n"
            "assert t.unavailable_reason() is None, t.unavailable_reason()\n")
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
