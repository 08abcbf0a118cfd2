"""pytest-benchmark suite over the registry's backends and the shape presets (benchmarks/conftest.py has
the options). Each case is checked against the float64 reference before it is timed, with the same check
and rows as ``python -m benchmarks.carafe`` (which adds the floor, memory and speedup columns).

    pytest benchmarks/ --benchmark-only                  # tiny preset
    pytest benchmarks/ --benchmark-disable               # CI: each case once, untimed (cannot rot)
    CARAFE_BENCH_SHAPES=target pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.carafe import (
    DTYPES,
    Oracle,
    check_impl,
    flops,
    impl_fn,
    least_bytes,
    make_inputs,
    mode_fn,
    resolve_backends,
)
from benchmarks.machine import torch_threads
from benchmarks.shapes import parse_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ORACLE = Oracle()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption
    shapes = parse_shapes(option("--carafe-shapes"))
    plan = resolve_backends(option("--carafe-backends"), DEVICE, shapes[0][1])
    cases = []
    for op in _split(option("--carafe-ops")):
        impls = list(plan.backends) + ["unfold"]
        if op == "fused":
            impls += [f"unfused:{b}" for b in plan.backends if b != "reference"]
        for _, shape in shapes:
            for dtype in _split(option("--carafe-dtypes")):
                for mode in _split(option("--carafe-modes")):
                    for impl in impls:
                        cases.append(pytest.param((op, shape, dtype, mode, impl),
                                                  id=f"{op}-{shape.id}-{dtype}-{mode}-{impl}"))
    metafunc.parametrize("bench_case", cases)


@pytest.fixture
def bench_threads(pytestconfig):
    """The --carafe-threads thread count for one case, then the previous count back (the rest of the
    session, tests included, must not inherit it)."""
    with torch_threads(int(pytestconfig.getoption("--carafe-threads"))):
        yield


def test_carafe(benchmark, bench_case, bench_threads):
    op, shape, dtype_name, mode, impl = bench_case
    dtype = DTYPES[dtype_name]
    features, second, grad_out = make_inputs(op, shape, dtype, DEVICE)
    reason = check_impl(op, impl, shape, dtype, features, second, grad_out, _ORACLE, need_grads=mode != "fwd")
    assert reason is None, f"{impl} fails the correctness check: {reason}"
    fn = mode_fn(impl_fn(op, impl, shape), mode, features, second, grad_out)
    if DEVICE == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    element_bytes = torch.finfo(dtype).bits // 8
    benchmark.group = f"{op}-{shape.id}-{dtype_name}-{mode}"
    benchmark.extra_info.update(op=op, shape=shape.id, dtype=dtype_name, mode=mode, impl=impl, device=DEVICE,
                                threads=torch.get_num_threads(), bytes=least_bytes(shape, mode, element_bytes),
                                flops=flops(shape, mode))
    benchmark(timed)
