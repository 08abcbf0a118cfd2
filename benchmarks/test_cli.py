"""The benchmark CLI itself (runs under `pytest benchmarks/ --benchmark-disable` in CI, so it cannot rot):
a tiny run writes the JSON the docs promise, and a backend that fails the correctness check is skipped
loudly and makes the exit status non-zero."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import carafe as cli

# --spread-limit: 10 ms of timing on a shared machine is not steady; these tests check the plumbing.
FAST = ["--shapes", "N1-C4-H3-W4-k3-g2-s2", "--min-run-time", "0.01", "--peak-gbps", "10", "--peak-gflops", "100",
        "--threads", "1", "--retime", "0", "--spread-limit", "1000"]


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
        # the fresh-allocation cost beside the kernel: one clone time per (op, shape, dtype), in every row
        assert row["out_clone_ms"] > 0 and row["vs_clone"] == pytest.approx(row["ms"] / row["out_clone_ms"])
    assert len({(row["op"], row["shape"], row["dtype"], row["out_clone_ms"]) for row in result["rows"]}) == len(
        {(row["op"], row["shape"], row["dtype"]) for row in result["rows"]})
    assert "x clone" in text
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


def test_cli_partial_backward_rows(tmp_path, capsys):
    """bwd_features / bwd_masks rows (one input requiring grad: the backward that computes only what is
    asked) are checked, timed and compared with the same implementation's full bwd ("x bwd")."""
    out = tmp_path / "run.json"
    modes = ["bwd", "fwdbwd", "bwd_features", "bwd_masks"]
    assert cli.main(FAST + ["--modes", ",".join(modes), "--ops", "fused,plain", "--json", str(out)]) == 0
    assert "x bwd" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert not result["skipped"] or all(s["kind"] == "skipped" for s in result["skipped"])
    rows = result["rows"]
    for row in rows:
        if row["mode"] in ("bwd_features", "bwd_masks"):
            full = next(r for r in rows if (r["op"], r["impl"], r["mode"]) == (row["op"], row["impl"], "bwd"))
            assert row["flops"] * 2 == full["flops"] and row["bytes"] < full["bytes"]
            if not (row.get("invalid") or full.get("invalid")):  # a noisy 10 ms timing may be gated out
                assert abs(row["vs_bwd"] - full["ms"] / row["ms"]) < 1e-9
    assert {(row["op"], row["mode"]) for row in rows} == {(op, mode) for op in ("fused", "plain") for mode in modes}


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
    out = capsys.readouterr().out
    assert "backend='cpu'" in out and "backend='auto'" in out and out.count("ratio") == 2


def _row(impl, mode, ms, p20=None, p80=None):
    return {"impl": impl, "mode": mode, "ms": ms, "p20": p20 or ms, "p80": p80 or ms}


def test_gate_finds_parts_slower_than_the_whole_and_wide_spreads():
    rows = [_row("cpu", "fwd", 82.0), _row("cpu", "bwd", 10.0), _row("cpu", "fwdbwd", 21.0),
            _row("reference", "fwd", 5.0), _row("reference", "bwd", 30.0), _row("reference", "fwdbwd", 20.0),
            _row("unfold", "fwd", 5.0, 4.0, 9.0), _row("unfold", "fwdbwd", 20.0),
            _row("unfused:cpu", "fwd", 5.0, 4.9, 5.2), _row("unfused:cpu", "fwdbwd", 20.0)]
    problems = cli.inconsistencies(rows, spread_limit=1.5)
    assert set(problems) == {"cpu", "reference", "unfold"}
    assert "fwd 82.000 ms > fwdbwd 21.000 ms" in problems["cpu"]
    assert "bwd 30.000 ms > fwdbwd 20.000 ms" in problems["reference"]
    assert "spread 2.25x" in problems["unfold"]


def test_median_over_runs_takes_each_rows_median_run():
    """Three runs of the same rows: each row is the whole row of its median run (its columns stay
    consistent), with the fastest and slowest time; a run where the row is invalid does not count."""
    def row(mode, ms, **extra):
        return dict(_row("cpu", mode, ms), op="fused", shape="N1-C4-H3-W4-k3-g2-s2", dtype="fp32", **extra)

    runs = [[row("fwd", 5.0), row("fwdbwd", 20.0)],
            [row("fwd", 9.0), row("fwdbwd", 18.0)],
            [row("fwd", 6.0), row("fwdbwd", 1.0, invalid="spread 3x")]]
    merged = {row["mode"]: row for row in cli.median_over_runs(runs)}
    assert merged["fwd"]["ms"] == 6.0 and merged["fwd"]["ms_range"] == [5.0, 9.0] and merged["fwd"]["runs"] == 3
    assert merged["fwdbwd"]["ms"] == 18.0 and merged["fwdbwd"]["ms_range"] == [18.0, 20.0]
    assert merged["fwdbwd"]["runs"] == 2 and not merged["fwdbwd"].get("invalid")


def test_from_json_of_several_runs_prints_medians(tmp_path, capsys):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"run-{i}.json"))
        assert cli.main(FAST + ["--modes", "fwd", "--ops", "fused", "--json", paths[-1]]) == 0
    capsys.readouterr()
    assert cli.main(["--from-json", *paths]) == 0
    text = capsys.readouterr().out
    assert "the median of 3 runs" in text and "over 3 runs" in text


def _slow_forward_timer(monkeypatch):
    """time_fn that reports every fwd as slower than its fwdbwd (the README's 82 ms vs 21 ms row)."""
    real = cli.time_fn

    def fake(fn, device, **kwargs):
        timing = real(fn, device, **kwargs)
        if fn.__name__ == "forward":  # mode_fn's fwd callable
            return {**timing, "ms": 1e3, "p20": 1e3, "p80": 1e3}
        return timing
    monkeypatch.setattr(cli, "time_fn", fake)


def test_inconsistent_rows_are_marked_invalid_not_printed(monkeypatch, tmp_path, capsys):
    _slow_forward_timer(monkeypatch)
    out = tmp_path / "run.json"
    args = FAST + ["--modes", "fwd,fwdbwd", "--backends", "reference", "--json", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "INVALID" in text and "1000.0" not in text.split("INVALID (a part")[0]
    result = json.loads(out.read_text())
    fwd_rows = [row for row in result["rows"] if row["mode"] == "fwd"]
    assert fwd_rows and all("fwd 1000.0 ms > fwdbwd" in row["invalid"] for row in fwd_rows)
    assert result["targets"] == []  # no target is computed from an invalid row


def test_inconsistent_rows_are_retimed_in_a_fresh_process(monkeypatch, tmp_path, capsys):
    _slow_forward_timer(monkeypatch)
    out = tmp_path / "run.json"
    args = [a if a != "0" else "1" for a in FAST]  # --retime 1
    assert cli.main(args + ["--modes", "fwd,fwdbwd", "--backends", "reference", "--ops", "plain",
                            "--json", str(out)]) == 0
    assert "in a fresh process" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {row["impl"] for row in rows if row.get("retimed") == 1} == {"reference", "unfold"}
    assert all(row["ms"] < 1e3 for row in rows), "the fresh process's times replace the bad ones"


def test_thread_count_is_restored():
    """The CLI and the pytest-benchmark suite (its bench_threads fixture) set torch's thread count
    through machine.torch_threads, which gives the previous count back, also after an error."""
    from benchmarks.machine import torch_threads

    previous = torch.get_num_threads()
    other = 1 if previous != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == previous
    try:
        with torch_threads(other):
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.get_num_threads() == previous
    assert cli.main(FAST + ["--modes", "fwd", "--backends", "reference", "--threads", str(other)]) == 0
    assert torch.get_num_threads() == previous
