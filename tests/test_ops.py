"""The dispatcher ops: torch.library.opcheck on every op (schema, autograd registration, fake tensors,
AOT dispatch with dynamic shapes), their autocast kernels and FLOP formulas.

Two families are checked: the native ``torch.ops.carafe_kernels.*`` (skipped with the reason when the
extension is not built), and a stand-in family ``carafe_kernels_test.*`` whose CPU kernels are written
here in Python (the reference forward and an analytic backward) and registered through the same
``carafe_kernels.ops.register_carafe_op_family``. The stand-in tests the Python registrations without a
compiler, and its analytic backward is a second, independent oracle for the reference's autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, make_inputs, shape_id, to_layout

from carafe_kernels import backend_status, carafe_flops
from carafe_kernels import ops as carafe_ops
from carafe_kernels.contract import SCHEMAS, check_output_mask
from carafe_kernels.ops import register_carafe_op_family
from carafe_kernels.reference import carafe_fused_reference, carafe_reference, normalize_mask_logits

NATIVE_REASON = backend_status()["cpu"]
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native ops unavailable: {NATIVE_REASON}")


# --- the stand-in op family ------------------------------------------------------------------------------

def analytic_carafe_backward(grad_out, features, masks, k, G, s):
    """(grad_features, grad_masks) of carafe written out, without autograd:
    grad_masks[n, g*k*k + t, y, x] = sum_{c in g} grad_out[n, c, y, x] * features_padded[n, c, y//s + ky, x//s + kx]
    grad_features = the adjoint gather: each tap's (grad_out * mask) summed over the s*s sub-pixels,
    added at the tap's offset into a padded buffer, then cropped."""
    N, C, H, W = features.shape
    r, Cg = (k - 1) // 2, C // G
    grad6 = grad_out.reshape(N, G, Cg, H, s, W, s)
    padded = F.pad(features, (r, r, r, r)).reshape(N, G, Cg, H + 2 * r, W + 2 * r)
    taps = masks.reshape(N, G, k * k, H, s, W, s)
    grad_padded = torch.zeros_like(padded)
    grad_masks = torch.empty_like(taps)
    for ky in range(k):
        for kx in range(k):
            t = ky * k + kx
            window = padded[:, :, :, ky:ky + H, kx:kx + W]
            grad_masks[:, :, t] = (grad6 * window[:, :, :, :, None, :, None]).sum(dim=2)
            grad_padded[:, :, :, ky:ky + H, kx:kx + W] += (grad6 * taps[:, :, t].unsqueeze(2)).sum(dim=(4, 6))
    grad_features = grad_padded[:, :, :, r:r + H, r:r + W].reshape(N, C, H, W)
    return _fresh(grad_features), _fresh(grad_masks.reshape(masks.shape))


def _fresh(t):
    """A new contiguous tensor at storage offset 0 (what a kernel returns; .contiguous() of an empty
    view keeps the view's offset)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def analytic_carafe_fused_backward(grad_out, features, logits, k, G, s):
    """Through the softmax (dz = m * (dm - sum_t dm * m)) and the pixel shuffle (its inverse)."""
    masks = normalize_mask_logits(logits, k, G, s)
    grad_features, grad_masks = analytic_carafe_backward(grad_out, features, masks, k, G, s)
    N, _, Ho, Wo = masks.shape
    m5 = masks.reshape(N, G, k * k, Ho, Wo)
    g5 = grad_masks.reshape(N, G, k * k, Ho, Wo)
    grad_z = m5 * (g5 - (g5 * m5).sum(dim=2, keepdim=True))
    # inverse of normalize's shuffle: (N, G, k*k, H, s, W, s) -> (N, G, k*k, s, s, H, W)
    H, W = Ho // s, Wo // s
    grad_logits = grad_z.reshape(N, G, k * k, H, s, W, s).permute(0, 1, 2, 4, 6, 3, 5).reshape(logits.shape)
    return grad_features, _fresh(grad_logits)


_LIB = torch.library.Library("carafe_kernels_test", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)
_LIB.impl("carafe", lambda f, m, k, g, s: _fresh(carafe_reference(f, m, k, g, s)), "CPU")
_LIB.impl("carafe_fused", lambda f, m, k, g, s: _fresh(carafe_fused_reference(f, m, k, g, s)), "CPU")
def _masked(backward):
    """The stand-in backward op: the analytic gradients, None where output_mask does not ask (the
    kernels' convention; the stand-in computes both and drops one, the kernels skip it)."""
    def op(grad_out, features, second, k, G, s, output_mask=(True, True)):
        check_output_mask(output_mask, "carafe_kernels_test backward")
        grads = backward(grad_out, features, second, k, G, s)
        return tuple(g if wanted else None for g, wanted in zip(grads, output_mask))
    return op


_LIB.impl("carafe_backward", _masked(analytic_carafe_backward), "CPU")
_LIB.impl("carafe_fused_backward", _masked(analytic_carafe_fused_backward), "CPU")
register_carafe_op_family("carafe_kernels_test::carafe", "carafe_kernels_test::carafe_backward")
register_carafe_op_family("carafe_kernels_test::carafe_fused", "carafe_kernels_test::carafe_fused_backward")

FAMILIES = [pytest.param("carafe_kernels_test", id="stand-in"),
            pytest.param("carafe_kernels", id="native", marks=needs_native)]
OP_NAMES = ["carafe", "carafe_backward", "carafe_fused", "carafe_fused_backward"]


def _op(namespace, name):
    return getattr(getattr(torch.ops, namespace), name).default


def _op_args(name, shape, dtype=torch.float32, layout="contiguous", output_mask=(True, True)):
    """Arguments of op `name`; forward ops get inputs that require grad (so opcheck checks autograd)."""
    N, C, H, W, k, G, s = shape
    fused = name.startswith("carafe_fused")
    features, second = make_inputs(*shape, fused=fused, dtype=dtype)
    features, second = to_layout(features, layout), to_layout(second, layout)
    if name.endswith("_backward"):
        grad_out = to_layout(torch.randn(N, C, H * s, W * s, dtype=dtype), layout)
        return (grad_out, features, second, k, G, s, list(output_mask))
    return (features.requires_grad_(True), second.requires_grad_(True), k, G, s)


OPCHECK_CASES = [((2, 4, 5, 3, 3, 2, 2), torch.float32, "contiguous"),
                 ((1, 6, 4, 4, 5, 3, 3), torch.float64, "channels_last"),
                 ((0, 4, 3, 3, 3, 1, 2), torch.float32, "contiguous")]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{shape_id(*c[0])}-{str(c[1])[6:]}-{c[2]}")
@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_opcheck(namespace, name, case):
    shape, dtype, layout = case
    torch.library.opcheck(_op(namespace, name), _op_args(name, shape, dtype, layout))


@pytest.mark.parametrize("shape", [(2, 4, 5, 3, 3, 2, 2), (1, 6, 4, 4, 5, 3, 3), (1, 2, 2, 2, 7, 1, 1)],
                         ids=lambda p: shape_id(*p))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_analytic_backward_matches_reference_autograd(fused, shape):
    """The stand-in's hand-written backward (the gather/reduction the kernels implement) equals
    PyTorch's autograd through the reference, in float64."""
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=fused, dtype=torch.float64)
    features.requires_grad_(True)
    second.requires_grad_(True)
    ref = carafe_fused_reference if fused else carafe_reference
    out = ref(features, second, k, G, s)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (features, second), grad_out)
    analytic = analytic_carafe_fused_backward if fused else analytic_carafe_backward
    got = analytic(grad_out, features.detach(), second.detach(), k, G, s)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_schema_is_the_contracts(namespace, name):
    """Every registered op (the C++ ones from csrc/carafe.cpp, the stand-in) has contract.SCHEMAS'
    schema; tests/test_triton.py checks the Triton ops the same way."""
    assert str(_op(namespace, name)._schema) == f"{namespace}::{name}{SCHEMAS[name]}"


def test_autocast_registration_works():
    """The autocast kernels use private torch APIs (see carafe_kernels/ops.py for why): this fails
    loudly when a torch upgrade breaks them, instead of the ops silently losing autocast."""
    assert carafe_ops.AUTOCAST_ERROR is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_op_autocast_follows_the_region_dtype(namespace, dtype):
    """The reason torch.library.register_autocast (one dtype fixed at registration) is not used: the
    ops run in whatever dtype the autocast region asks for, as a convolution does."""
    shape = N, C, H, W, k, G, s = (1, 4, 3, 3, 3, 2, 2)
    features, logits = make_inputs(*shape, fused=True)
    with torch.autocast("cpu", dtype=dtype):
        out = _op(namespace, "carafe_fused")(features, logits, k, G, s)
    assert out.dtype == dtype


@pytest.mark.parametrize("name", ["carafe", "carafe_fused"])
@pytest.mark.parametrize("namespace", FAMILIES)
def test_op_autocast_leaves_float64_alone(namespace, name):
    """The ops' autocast kernels cast float32/float16/bfloat16 only, as PyTorch's autocast does."""
    features, second, k, G, s = _op_args(name, (1, 4, 3, 3, 3, 2, 2), torch.float64)
    expected = _op(namespace, name)(features, second, k, G, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _op(namespace, name)(features, second, k, G, s)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("namespace", FAMILIES)
def test_backward_returns_only_the_requested_gradients(namespace, needs):
    features, second, k, G, s = _op_args("carafe_fused", (1, 2, 3, 3, 3, 1, 2), torch.float64)
    features.requires_grad_(needs[0])
    second.requires_grad_(needs[1])
    out = _op(namespace, "carafe_fused")(features, second, k, G, s)
    wanted = features if needs[0] else second
    (grad,) = torch.autograd.grad(out.sum(), (wanted,))
    assert grad.shape == wanted.shape
    assert (features.grad, second.grad) == (None, None)


# --- output_mask: the backward computes only what is asked ----------------------------------------------

OUTPUT_MASKS = [pytest.param((True, False), id="features-only"), pytest.param((False, True), id="masks-only"),
                pytest.param((False, False), id="none")]
BACKWARD_NAMES = ["carafe_backward", "carafe_fused_backward"]


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS)
@pytest.mark.parametrize("name", BACKWARD_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_opcheck_output_mask(namespace, name, output_mask):
    """The fake kernels and AOT dispatch agree with the kernels on the None slots."""
    torch.library.opcheck(_op(namespace, name), _op_args(name, (2, 4, 5, 3, 3, 2, 2), output_mask=output_mask))


# Shapes for the bitwise comparisons: several row blocks per task and halo rows at both borders (H=11),
# every sub-pixel block width (s = 1, 2, 3), groups, channel blocks of 16 and a remainder (C/G = 20).
MASK_SHAPES = [(2, 4, 11, 6, 3, 2, 2), (1, 40, 9, 7, 5, 2, 3), (1, 3, 4, 17, 5, 1, 1)]


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda p: shape_id(*p))
@pytest.mark.parametrize("name", BACKWARD_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_output_mask_gives_the_full_backwards_gradients(namespace, name, shape, dtype, output_mask):
    """Each gradient asked for is bitwise the one of a call that asks for both (the kernels are
    deterministic); the other slot is None (the kernels returned an undefined tensor: nothing allocated)."""
    args = _op_args(name, shape, dtype, output_mask=(True, True))
    full = _op(namespace, name)(*args)
    got = _op(namespace, name)(*args[:-1], list(output_mask))
    for wanted, g, f in zip(output_mask, got, full):
        if wanted:
            assert torch.equal(g, f)
            assert g.stride() == f.stride()
        else:
            assert g is None


@pytest.mark.parametrize("name", BACKWARD_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_output_mask_defaults_to_both(namespace, name):
    """A call without output_mask (a caller, or a torch.compile backward graph cached before the argument
    existed) computes both gradients, as before; the fake kernel agrees."""
    args = _op_args(name, (2, 4, 5, 3, 3, 2, 2))
    full = _op(namespace, name)(*args)
    for got, want in zip(_op(namespace, name)(*args[:-1]), full):
        assert torch.equal(got, want)
    torch.library.opcheck(_op(namespace, name), args[:-1])


class _BackwardCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each call of a CARAFE backward op: its output_mask and what it returned."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("carafe_backward", "carafe_fused_backward")):
            self.calls.append((list(args[6]), out))
        return out


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("name", ["carafe", "carafe_fused"])
@pytest.mark.parametrize("namespace", FAMILIES)
def test_autograd_asks_the_kernel_only_for_the_needed_gradient(namespace, name, needs):
    """With one input not requiring grad, autograd calls the backward op once, with that output_mask,
    and the op leaves the other slot empty: the kernel was not asked for it. The gradient equals the
    full backward's bitwise."""
    features, second, k, G, s = _op_args(name, (2, 4, 5, 3, 3, 2, 2), torch.float32)
    grad_out = torch.randn(2, 4, 10, 6)
    expected = _op(namespace, name + "_backward")(grad_out, features.detach(), second.detach(), k, G, s,
                                                  [True, True])
    features.requires_grad_(needs[0])
    second.requires_grad_(needs[1])
    wanted = 0 if needs[0] else 1
    with _BackwardCalls() as recorder:
        out = _op(namespace, name)(features, second, k, G, s)
        (grad,) = torch.autograd.grad(out, ((features, second)[wanted],), grad_out)
    assert len(recorder.calls) == 1
    output_mask, returned = recorder.calls[0]
    assert output_mask == list(needs)
    assert returned[1 - wanted] is None and returned[wanted] is not None
    assert torch.equal(grad, expected[wanted])


@pytest.mark.parametrize("name", BACKWARD_NAMES)
@pytest.mark.parametrize("namespace", FAMILIES)
def test_output_mask_of_another_length_is_refused(namespace, name):
    """The schema's bool[2] is not enforced by the dispatcher: the kernels and the fake kernels check it."""
    args = _op_args(name, (1, 4, 3, 3, 3, 2, 2))
    for bad in ([True], [True, True, False]):
        with pytest.raises(ValueError, match=f"output_mask must have 2 elements .* got {len(bad)}"):
            _op(namespace, name)(*args[:-1], bad)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args[:-1]]
        with pytest.raises(ValueError, match="output_mask must have 2 elements .* got 1"):
            _op(namespace, name)(*fake, [True])


@pytest.mark.parametrize("namespace", FAMILIES)
def test_flop_counter_counts_the_gradients_asked_for(namespace):
    """A backward that computes one gradient counts one multiply-add per tap per output element."""
    from torch.utils.flop_counter import FlopCounterMode

    features, logits = make_inputs(2, 8, 4, 5, 5, 2, 2, fused=True)
    logits.requires_grad_(True)  # features frozen: the mask gradient only
    with FlopCounterMode(display=False) as counter:
        _op(namespace, "carafe_fused")(features, logits, 5, 2, 2).sum().backward()
    assert counter.get_total_flops() == 2 * carafe_flops(features.shape, 5, 2)


@pytest.mark.parametrize("namespace", FAMILIES)
def test_fake_kernels_check_shapes(namespace):
    """Under fake tensors (torch.compile, torch.export) a bad call fails as in eager, with the same
    exception types: ValueError for a shape, TypeError for a dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        features = torch.empty(1, 4, 3, 3)
        with pytest.raises(ValueError, match=r"masks must have G\*k\*k = 1\*3\*3 = 9 channels"):
            _op(namespace, "carafe")(features, torch.empty(1, 8, 6, 6), 3, 1, 2)
        with pytest.raises(ValueError, match=r"mask_logits must be 3x3 spatially"):
            _op(namespace, "carafe_fused")(features, torch.empty(1, 36, 3, 4), 3, 1, 2)
        with pytest.raises(ValueError, match=r"kernel_size must be odd and in \[1, 11\]"):
            _op(namespace, "carafe")(features, torch.empty(1, 169, 6, 6), 13, 1, 2)
        with pytest.raises(TypeError, match=r"features and masks must have the same dtype"):
            _op(namespace, "carafe")(features, torch.empty(1, 9, 6, 6, dtype=torch.float64), 3, 1, 2)
        with pytest.raises(ValueError, match=r"grad_output must have the output's shape"):
            _op(namespace, "carafe_backward")(torch.empty(1, 4, 6, 5), features, torch.empty(1, 9, 6, 6), 3, 1, 2,
                                              [True, True])


@pytest.mark.parametrize("name", ["carafe", "carafe_fused"])
@pytest.mark.parametrize("namespace", FAMILIES)
def test_op_autocast(namespace, name):
    """The ops' own Autocast kernels (for callers of torch.ops.* that bypass carafe_kernels.functional):
    mixed fp32/bf16 inputs run in the autocast dtype."""
    shape = N, C, H, W, k, G, s = (2, 4, 3, 3, 3, 2, 2)
    features, second = make_inputs(*shape, fused=name == "carafe_fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _op(namespace, name)(features, second.to(torch.bfloat16), k, G, s)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("namespace", FAMILIES)
def test_op_double_backward(namespace):
    """The plain op's backward is differentiable (carafe_kernels/ops.py, BackwardRule): gradgradcheck
    in float64, reverse over reverse and forward over reverse."""
    features, second, k, G, s = _op_args("carafe", (1, 2, 3, 3, 3, 1, 2), torch.float64)
    op = _op(namespace, "carafe")
    assert torch.autograd.gradgradcheck(lambda f, m: op(f, m, k, G, s), (features, second))
    assert torch.autograd.gradcheck(lambda f, m: op(f, m, k, G, s), (features, second), check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("namespace", FAMILIES)
def test_op_fused_double_backward_raises(namespace):
    features, second, k, G, s = _op_args("carafe_fused", (1, 2, 3, 3, 3, 1, 2), torch.float64)
    out = _op(namespace, "carafe_fused")(features, second, k, G, s)
    grads = torch.autograd.grad(out.sum(), (features, second), create_graph=True)
    with pytest.raises(NotImplementedError, match="through the fused CARAFE op are not supported"):
        torch.autograd.grad(grads[0].sum() + grads[1].sum(), (features, second))


@pytest.mark.parametrize("namespace", FAMILIES)
def test_flop_counter(namespace):
    """torch.utils.flop_counter sees the ops: 2*N*C*Ho*Wo*k*k forward, twice that backward."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = N, C, H, W, k, G, s = (2, 8, 4, 5, 5, 2, 2)
    features, logits = make_inputs(*shape, fused=True)
    features.requires_grad_(True)
    logits.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        out = _op(namespace, "carafe_fused")(features, logits, k, G, s)
        out.sum().backward()
    forward = carafe_flops(features.shape, k, s)
    assert forward == 2 * N * C * H * s * W * s * k * k
    assert counter.get_total_flops() == 3 * forward


# --- the native ops' memory format: channels_last on CUDA, NCHW on CPU ---------------------------------
# (op name, fused, down); one shape whose channels_last tensors are not also contiguous NCHW.
NATIVE_OPS = [("carafe", False, False), ("carafe_fused", True, False), ("carafe_down", False, True),
              ("carafe_down_fused", True, True)]
LAYOUT_SHAPE = (2, 8, 5, 6, 3, 2, 2)


def _native_op_tensors(fused, down, device, memory_format, dtype=torch.float32):
    """features, masks or logits, grad_output of LAYOUT_SHAPE on `device`, in `memory_format`."""
    N, C, H, W, k, G, s = LAYOUT_SHAPE
    Ho, Wo = ((H + s - 1) // s, (W + s - 1) // s) if down else (H * s, W * s)
    second = (N, G * k * k * s * s, H, W) if fused and not down else (N, G * k * k, Ho, Wo)
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen, dtype=dtype).to(device).contiguous(memory_format=memory_format)
                 for shape in ((N, C, H, W), second, (N, C, Ho, Wo)))


def _fake_on(mode, device: str, t: torch.Tensor):
    """A fake tensor of t's shape, dtype and strides on `device` ("cuda" needs no GPU: fake tensors have
    meta storage; torch's factory functions refuse a CUDA device on a CPU-only build, this does not)."""
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return FakeTensor(mode, meta, torch.device("cuda", 0) if device == "cuda" else torch.device(device))


@needs_native
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name, fused, down", NATIVE_OPS, ids=[op[0] for op in NATIVE_OPS])
def test_native_fake_kernels_give_the_kernels_memory_format(name, fused, down, device):
    """The CUDA kernels read channels_last features in place and return channels_last outputs and
    gradients (csrc/cuda/carafe_cuda.cpp), the CPU kernels return NCHW: the fake kernels (torch.compile,
    torch.export) must give the same strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    k, G, s = LAYOUT_SHAPE[4:]
    forward = getattr(torch.ops.carafe_kernels, name)
    backward = getattr(torch.ops.carafe_kernels, name + "_backward")
    for memory_format in (torch.channels_last, torch.contiguous_format):
        mode = FakeTensorMode()
        features, second, grad = (_fake_on(mode, device, t)
                                  for t in _native_op_tensors(fused, down, "cpu", memory_format))
        with mode:
            out = forward(features, second, k, G, s)
            grads = backward(grad, features, second, k, G, s, [True, True])
        cuda_channels_last = device == "cuda" and memory_format == torch.channels_last
        for what, t in zip(("output", "grad_features", "grad_masks"), (out, *grads)):
            assert t.device.type == device
            assert t.is_contiguous(memory_format=torch.channels_last) == cuda_channels_last, what
            assert t.is_contiguous() != cuda_channels_last, what


def test_native_layout_is_follow_channels_last_on_cuda_only():
    # The rule itself, with the edge cases of follow_channels_last: one channel and 1x1 images are
    # contiguous NCHW too, and stay NCHW; CPU (and meta) tensors are always NCHW.
    from torch._subclasses.fake_tensor import FakeTensorMode

    cl, nchw = torch.channels_last, torch.contiguous_format
    mode = FakeTensorMode()
    cases = [((2, 8, 5, 6), cl, "cuda", cl), ((2, 8, 5, 6), nchw, "cuda", nchw), ((2, 1, 5, 6), cl, "cuda", nchw),
             ((2, 8, 1, 1), cl, "cuda", nchw), ((2, 8, 5, 6), cl, "cpu", nchw), ((2, 8, 5, 6), cl, "meta", nchw)]
    for shape, memory_format, device, want in cases:
        t = torch.empty(shape).contiguous(memory_format=memory_format)
        t = t.to("meta") if device == "meta" else _fake_on(mode, device, t)
        assert carafe_ops.native_layout(t) == want, (shape, memory_format, device)


@needs_native
@pytest.mark.skipif(backend_status()["cuda"] is not None, reason=f"cuda backend: {backend_status()['cuda']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, fused, down", NATIVE_OPS, ids=[op[0] for op in NATIVE_OPS])
def test_cuda_channels_last_is_returned_and_equals_nchw(name, fused, down, dtype):
    """On a GPU: channels_last inputs give channels_last outputs and gradients (the channels_last
    kernels), equal within the dtype's tolerance to those of the same values in NCHW (the NCHW kernels);
    each output_mask gives bitwise the full backward's gradient."""
    k, G, s = LAYOUT_SHAPE[4:]
    forward = getattr(torch.ops.carafe_kernels, name)
    backward = getattr(torch.ops.carafe_kernels, name + "_backward")
    results = {}
    for memory_format in (torch.channels_last, torch.contiguous_format):
        features, second, grad = _native_op_tensors(fused, down, "cuda", memory_format, dtype)
        results[memory_format] = (forward(features, second, k, G, s),
                                  *backward(grad, features, second, k, G, s, [True, True]))
        if memory_format == torch.channels_last:
            only_f = backward(grad, features, second, k, G, s, [True, False])
            only_m = backward(grad, features, second, k, G, s, [False, True])
            assert torch.equal(only_f[0], results[memory_format][1]) and only_f[1] is None
            assert torch.equal(only_m[1], results[memory_format][2]) and only_m[0] is None
    for what, cl, nchw in zip(("output", "grad_features", "grad_masks"), results[torch.channels_last],
                              results[torch.contiguous_format]):
        assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous(), what
        torch.testing.assert_close(cl.float(), nchw.float(), **TOLERANCES[dtype], msg=lambda m, w=what: f"{w}: {m}")
