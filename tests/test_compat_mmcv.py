"""mmcv's CARAFE API: carafe_naive / CARAFENaive, and the opt-in mmcv shim running third-party-style
code unchanged. Shim tests run in a subprocess so the stand-in mmcv modules never leak into this one."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from carafe_kernels import CARAFE, CARAFENaive, carafe, carafe_naive

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(ROOT)) if p),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_carafe_naive_is_carafe():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    m = torch.rand(2, 2 * 9, 10, 12, dtype=torch.float64)
    expected = carafe(f, m, 3, 2, 2, backend="reference")
    torch.testing.assert_close(carafe_naive(f, m, 3, 2, 2), expected)
    torch.testing.assert_close(CARAFENaive(3, 2, 2)(f, m), expected)
    torch.testing.assert_close(CARAFE(3, 2, 2)(f, m), expected)


def test_carafe_naive_validates_like_carafe():
    with pytest.raises(ValueError, match="masks"):
        carafe_naive(torch.randn(1, 4, 4, 4), torch.rand(1, 9, 4, 4), 3, 1, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        CARAFENaive(4, 1, 2)


def test_carafe_naive_gradients():
    f = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    m = torch.rand(1, 9, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: carafe_naive(a, b, 3, 1, 2), (f, m))


def test_shim_runs_third_party_style_code_unchanged():
    result = _run("""
        import importlib.util, torch
        assert importlib.util.find_spec("mmcv") is None, "this test needs an environment without mmcv"
        import carafe_kernels.compat.mmcv as shim
        assert "mmcv" not in __import__("sys").modules, "importing the shim must not install it"
        shim.install()
        shim.install()  # idempotent
        from mmcv.ops.carafe import (carafe, carafe_naive, CARAFE, CARAFENaive, CARAFEPack, normal_init,
                                     xavier_init)
        from mmcv.ops import CARAFEPack as Pack2, carafe as carafe2
        from mmcv.cnn import normal_init as normal_init2, constant_init, kaiming_init
        import carafe_kernels
        assert CARAFEPack is Pack2 is carafe_kernels.CARAFEPack and carafe is carafe2 is carafe_kernels.carafe
        assert carafe_naive is carafe_kernels.carafe_naive and CARAFENaive is carafe_kernels.CARAFENaive

        from tests.third_party_style.fusion_upsampler import FusionUpsampler
        torch.manual_seed(0)
        hr, lr = torch.randn(2, 8, 12, 12), torch.randn(2, 16, 6, 6)
        for naive in (False, True):
            model = FusionUpsampler(8, 16, use_naive=naive).eval()
            out = model(hr, lr)
            assert out.shape == (2, 8, 12, 12), out.shape
            # The same computation written against carafe_kernels directly.
            mask = model.kernel(hr, lr)
            up = carafe_kernels.carafe(model.lr_proj(lr), mask, 5, 1, 2, backend="reference")
            torch.testing.assert_close(out, model.refine(hr + up), rtol=1e-5, atol=1e-5)
        # mmcv's initialisers: the content encoder got N(0, 0.001), the others Xavier-uniform and zero bias.
        assert model.content_encoder.weight.std() < 0.002 and model.lr_proj.bias.abs().max() == 0
        shim.uninstall()
        assert "mmcv" not in __import__("sys").modules
        print("OK")
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_shim_refuses_when_real_mmcv_is_importable(tmp_path):
    (tmp_path / "mmcv").mkdir()
    (tmp_path / "mmcv" / "__init__.py").write_text("REAL = True\n")
    result = _run("""
        import carafe_kernels.compat.mmcv as shim
        try:
            shim.install()
        except RuntimeError as exc:
            print("REFUSED:", exc)
        import mmcv
        assert mmcv.REAL
        """, extra_path=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "REFUSED:" in result.stdout and "real mmcv is importable" in result.stdout


def test_initialisers_reject_unknown_distribution():
    from carafe_kernels.compat.mmcv import kaiming_init, xavier_init
    conv = torch.nn.Conv2d(2, 2, 1)
    with pytest.raises(ValueError, match="distribution"):
        xavier_init(conv, distribution="gaussian")
    with pytest.raises(ValueError, match="distribution"):
        kaiming_init(conv, distribution="gaussian")
