"""The benchmark CLI itself (runs under `pytest benchmarks/ --benchmark-disable` in CI, so it cannot rot):
a tiny run writes the JSON the docs promise, and a backend that fails the correctness check is skipped
loudly and makes the exit status non-zero."""
from __future__ import annotations

import json

import torch

from benchmarks import carafe as cli

FAST = ["--shapes", "N1-C4-H3-W4-k3-g2-s2", "--min-run-time", "0.01", "--peak-gbps", "10", "--peak-gflops", "100",
        "--threads", "1"]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert cli.main(FAST + ["--modes", "fwd,fwdbwd", "--ops", "fused,plain", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Machine: ")
    result = json.loads(out.read_text())
    assert {"machine", "peaks", "args", "rows", "skipped", "targets"} <= set(result)
    assert result["machine"]["git"]["sha"] and result["machine"]["torch"] == torch.__version__
    impls = {row["impl"] for row in result["rows"]}
    assert {"reference", "unfold"} <= impls
    for row in result["rows"]:
        assert row["ms"] > 0 and row["p20"] <= row["ms"] <= row["p80"]
        assert row["floor_ms"] > 0 and row["bytes"] > 0 and row["peak_bytes"] >= 0
        assert row["vs_unfold"] is not None and row["vs_reference"] is not None
    fused_impls = {row["impl"] for row in result["rows"] if row["op"] == "fused"}
    assert all(f"unfused:{b}" in fused_impls for b in result["backends"] if b != "reference")
    # --from-json re-prints without running
    assert cli.main(["--from-json", str(out)]) == 0
    assert "fused" in capsys.readouterr().out


def test_cli_skips_a_wrong_backend_loudly(monkeypatch, tmp_path, capsys):
    real = cli.impl_fn

    def broken(op, impl, shape):
        fn = real(op, impl, shape)
        if impl == "reference":
            return lambda f, m: fn(f, m) * 1.01
        return fn
    monkeypatch.setattr(cli, "impl_fn", broken)
    out = tmp_path / "run.json"
    assert cli.main(FAST + ["--modes", "fwd", "--backends", "reference", "--json", str(out)]) == 1
    assert "!! reference FAILED the correctness check" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "reference" not in {row["impl"] for row in result["rows"]}
    assert result["skipped"][0]["impl"] == "reference" and result["skipped"][0]["kind"] == "failed check"


def test_cost_model():
    shape = cli.Shape(2, 256, 44, 44)
    out = 2 * 256 * 88 * 88
    assert cli.flops(shape, "fwd") == 2 * out * 25
    assert cli.least_bytes(shape, "fwd", 4) == 4 * (2 * 256 * 44 * 44 + 2 * 100 * 44 * 44 + out)
    peaks = {"gbps": 1.0, "gflops": 1e6}  # memory-bound
    assert abs(cli.floor_ms(shape, "fwd", 4, peaks) - cli.least_bytes(shape, "fwd", 4) / 1e9 * 1e3) < 1e-9


def test_overhead_benchmark_runs(capsys):
    """benchmarks/overhead.py (public call vs direct op call) runs and reports a ratio."""
    import pytest

    from benchmarks import overhead
    from carafe_kernels import backend_status

    if backend_status()["cpu"] is not None:
        pytest.skip(f"cpu: {backend_status()['cpu']}")
    assert overhead.main(["--min-run-time", "0.05"]) == 0
    assert "ratio" in capsys.readouterr().out
