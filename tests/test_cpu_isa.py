"""The CPU kernels' instruction-set dispatch. One build carries the kernels compiled for avx512_bf16,
avx512, avx2 and default (csrc/cpu/carafe_cpu_isa_*.cpp) and runs the widest one that both the machine
and ATEN_CPU_CAPABILITY allow. Each level is run here in a subprocess (the choice is made once per
process) and checked against the float64 oracle, forward and both gradients, in bf16 and fp32.

The avx512_bf16 kernels compute the bf16 forward of the up ops with another algorithm (dot products of
bf16 pairs, vdpbf16ps: docs/design.md#cpu-kernels), so on a machine that has AVX512-BF16 this file is
also where that path meets the machines that lack it: both must stay within the oracle's bounds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_oracle, make_inputs, oracle, shape_id

import carafe_kernels

pytestmark = pytest.mark.skipif(carafe_kernels.backend_status()["cpu"] is not None,
                                reason=f"the cpu backend is unavailable: {carafe_kernels.backend_status()['cpu']}")

# (N, C, H, W, k, G, s): every kernel size's pairing (k = 1: no pair, 3: one pair and the odd tap,
# 5, 7), every scale's register blocking (s = 1, 3, 2 and 4), ragged widths (not a multiple of the 16
# lanes), channels not a multiple of the channel block, groups; k = 9 and 11: the grad_features gather's
# column shifts in several register blocks (5 + 4 and 5 + 5 + 1).
SHAPES = [(1, 3, 5, 7, 1, 1, 2), (2, 5, 6, 19, 3, 1, 1), (1, 8, 7, 17, 5, 2, 2), (1, 6, 4, 33, 5, 3, 3),
          (1, 4, 5, 9, 7, 1, 4), (2, 64, 11, 21, 5, 4, 2), (1, 6, 10, 23, 9, 2, 2), (1, 4, 12, 13, 11, 1, 2)]
OPS = ("plain", "fused")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

_CHILD = r"""
import sys, torch
import carafe_kernels
from carafe_kernels import carafe, carafe_fused
sys.path.insert(0, sys.argv[2])
from conftest import forward_backward, make_inputs
torch.set_num_threads(1)
results = {"isa": torch.ops.carafe_kernels._cpu_kernel_isa()}
for shape in eval(sys.argv[3]):
    N, C, H, W, k, G, s = shape
    for op in ("plain", "fused"):
        fn = carafe_fused if op == "fused" else carafe
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            f, m = make_inputs(*shape, fused=op == "fused", dtype=dtype)
            results[(shape, op, name)] = forward_backward(lambda a, b: fn(a, b, k, G, s, backend="cpu"), f, m)
# k = 1: out = features * mask, one exact fp32 product rounded once to bf16, through every store path
# (s = 1: a plain row; s = 2: the pair-interleaved row; s = 3: the generic interleave)
gen = torch.Generator().manual_seed(7)
f = (torch.randn(2, 3, 5, 37, generator=gen) * 10.0 ** torch.randint(-40, 39, (2, 3, 5, 37), generator=gen)).bfloat16()
f.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
for s in (1, 2, 3):
    m = torch.rand(2, 1, 5 * s, 37 * s, generator=gen).bfloat16()
    results[("k1", s)] = (f, m, carafe(f, m, 1, 1, s, backend="cpu"))
torch.save(results, sys.argv[1])
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _expected_isa(cap: str | None) -> str:
    """What the dispatch must pick under ATEN_CPU_CAPABILITY=cap on this machine (x86-64 Linux)."""
    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
    levels = [("avx512_bf16", avx512 and "avx512_bf16" in flags), ("avx512", avx512),
              ("avx2", {"avx2", "fma"} <= flags), ("default", True)]
    allowed = {None: 0, "avx512": 1, "avx2": 2, "default": 3}[cap]
    return next(name for name, present in levels[allowed:] if present)


@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    """cap -> the child's results, one child per ATEN_CPU_CAPABILITY value for the whole module."""
    cache: dict = {}

    def get(cap: str | None) -> dict:
        if cap not in cache:
            cache[cap] = _run_child(cap, tmp_path_factory.mktemp("isa"))
        return cache[cap]
    return get


def _run_child(cap: str | None, tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if cap is not None:
        env["ATEN_CPU_CAPABILITY"] = cap
    out = tmp_path / f"isa-{cap}.pt"
    subprocess.run([sys.executable, "-c", _CHILD, str(out), str(Path(__file__).parent), repr(SHAPES)], env=env,
                   check=True, timeout=600)
    return torch.load(out, weights_only=False)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="the instruction-set levels are x86-64's")
@pytest.mark.parametrize("cap", [None, "avx512", "avx2", "default"], ids=lambda c: f"cap-{c or 'none'}")
def test_each_instruction_set_matches_the_oracle(cap, child_results):
    results = child_results(cap)
    assert results["isa"] == _expected_isa(cap), f"ATEN_CPU_CAPABILITY={cap}: ran {results['isa']}"
    for shape in SHAPES:
        N, C, H, W, k, G, s = shape
        for op in OPS:
            for name, dtype in DTYPES.items():
                features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype)
                want = oracle(op, features, second, k, G, s)
                got = results[(shape, op, name)]
                tag = f"{results['isa']} {op} {shape_id(*shape)}"
                for what, a, b in zip(("output", "grad features", "grad masks"), got, want):
                    assert_close_to_oracle(a, b, dtype, f"{tag} {what}")


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="the instruction-set levels are x86-64's")
@pytest.mark.parametrize("cap", [None, "avx512", "avx2", "default"], ids=lambda c: f"cap-{c or 'none'}")
def test_bf16_stores_round_like_torch(cap, child_results):
    """With k = 1 every output is one exact fp32 product, so the bf16 output must be torch's own rounding
    of it bit for bit (round to nearest even, NaN and infinities kept, subnormals included): the
    vectorised fp32 -> bf16 stores of every instruction set, at every store path (s = 1, 2, 3). (The
    values span 1e-40 to 1e38, so products land in the subnormal range and on rounding boundaries.)"""
    results = child_results(cap)
    for s in (1, 2, 3):
        f, m, out = results[("k1", s)]
        want = (f.float().repeat_interleave(s, 2).repeat_interleave(s, 3) * m.float()).bfloat16()
        # (a sum starts at +0, so -0 * m comes out +0: the sign of a zero is not the rounding's)
        same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan()) | (
            (out == 0) & (want == 0))
        assert bool(same.all()), f"{results['isa']} s={s}: {int((~same).sum())} outputs differ from torch's rounding"
