"""ONNX export (carafe_kernels.onnx): every backend choice exports, the graph runs in onnxruntime with
dynamic batch and spatial size and matches PyTorch (max relative error <= 1e-4 in fp32)."""
import io
import subprocess
import sys
import warnings

import pytest
import torch

from carafe_kernels import CARAFE, CARAFEDownPack, CARAFEPack, _native, carafe, carafe_down, carafe_fused
from carafe_kernels.onnx import DECOMPOSITIONS, decomposition_table, use_decomposition
from carafe_kernels.reference import carafe_fused_reference, carafe_reference

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MAX_RELATIVE_ERROR = 1e-4
DYNAMIC = {0: "batch", 2: "height", 3: "width"}


def _export(model, args, dynamic_shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def _run(session, *inputs):
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feed)[0])


def _relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", sorted(DECOMPOSITIONS))
@pytest.mark.parametrize("k,G,s", [(5, 1, 2), (3, 2, 3), (1, 4, 1)])
def test_decompositions_compute_carafe(name, k, G, s):
    torch.manual_seed(0)
    f = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    logits = torch.randn(2, G * k * k * s * s, 5, 7, dtype=torch.float64)
    masks = torch.rand(2, G * k * k, 5 * s, 7 * s, dtype=torch.float64)
    plain, fused = DECOMPOSITIONS[name]
    torch.testing.assert_close(plain(f, masks, k, G, s), carafe_reference(f, masks, k, G, s))
    torch.testing.assert_close(fused(f, logits, k, G, s), carafe_fused_reference(f, logits, k, G, s))


# Every backend name exports, whether or not it can run here: the exported graph does not depend on it.
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "cuda", "triton"])
def test_carafepack_exports_on_every_backend_choice(backend):
    torch.manual_seed(0)
    model = CARAFEPack(16, scale_factor=2, up_group=2, compressed_channels=8, backend=backend).eval()
    for p in model.parameters():  # non-trivial masks (mmcv's init makes them nearly uniform)
        p.data.normal_(0, 0.3)
    session = _export(model, (torch.randn(2, 16, 6, 8),), (DYNAMIC,))
    for shape in [(2, 16, 6, 8), (3, 16, 9, 5)]:  # another batch and spatial size than exported with
        x = torch.randn(*shape)
        expected = carafe_fused(x, model.content_encoder(model.channel_compressor(x)), 5, 2, 2,
                                backend="reference").detach()
        assert _relative_error(_run(session, x), expected) <= MAX_RELATIVE_ERROR


def test_carafe_module_exports():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.carafe = CARAFE(3, 1, 2)

        def forward(self, features, masks):
            return self.carafe(features, masks)

    f, m = torch.randn(1, 4, 5, 6), torch.rand(1, 9, 10, 12)
    session = _export(Wrapper(), (f, m), ({0: "batch", 2: "h", 3: "w"}, {0: "batch", 2: "h2", 3: "w2"}))
    f, m = torch.randn(2, 4, 7, 3), torch.rand(2, 9, 14, 6)
    assert _relative_error(_run(session, f, m), carafe(f, m, 3, 1, 2, backend="reference")) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_carafe_down_pack_exports_and_matches(backend):
    """The down op exports as the reference computes it (strided slices, Softmax); dynamic batch and
    spatial size, including sizes the stride does not divide."""
    torch.manual_seed(0)
    model = CARAFEDownPack(8, down_group=2, compressed_channels=8, backend=backend).eval()
    for p in model.parameters():  # non-trivial masks (mmcv's init makes them nearly uniform)
        p.data.normal_(0, 0.3)
    session = _export(model, (torch.randn(2, 8, 6, 8),), (DYNAMIC,))
    for shape in [(2, 8, 6, 8), (3, 8, 9, 5), (1, 8, 7, 7)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        got = _run(session, x)
        assert got.shape == expected.shape == (shape[0], 8, (shape[2] + 1) // 2, (shape[3] + 1) // 2)
        assert _relative_error(got, expected) <= MAX_RELATIVE_ERROR


def test_carafe_down_function_exports():
    class Down(torch.nn.Module):
        def forward(self, features, masks):
            return carafe_down(features, masks, 3, 2, 3)

    f, m = torch.randn(1, 4, 7, 6), torch.rand(1, 18, 3, 2)
    session = _export(Down(), (f, m), ({0: "batch", 2: "h", 3: "w"}, {0: "batch", 2: "h2", 3: "w2"}))
    f, m = torch.randn(2, 4, 10, 4), torch.rand(2, 18, 4, 2)
    assert _relative_error(_run(session, f, m), carafe_down(f, m, 3, 2, 3)) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("spec", ["cares_unet", "cares_unet[downsampler=carafe]"])
def test_cares_unet_exports_and_matches(spec):
    from cares.models import build_model

    torch.manual_seed(0)
    model = build_model(spec, base_channels=4).eval()
    session = _export(model, (torch.randn(1, 1, 32, 32),), (DYNAMIC,))
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        expected = model(x)
    assert _relative_error(_run(session, x), expected) <= MAX_RELATIVE_ERROR


@pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"native ops unavailable: {_native.NATIVE_ERROR}")
def test_program_captured_outside_export_decomposes():
    model = CARAFEPack(8, scale_factor=2, compressed_channels=4, backend="cpu").eval()
    x = torch.randn(1, 8, 4, 4)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "carafe_kernels.carafe_fused.default" in targets
    program = program.run_decompositions(decomposition_table())
    assert not any(str(n.target).startswith("carafe_kernels.") for n in program.graph.nodes)
    session = _export(program, None, None)
    with torch.no_grad():
        assert _relative_error(_run(session, x), model(x)) <= MAX_RELATIVE_ERROR


def test_use_decomposition_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown decomposition"):
        with use_decomposition("fastest"):
            pass


def test_torchscript_refused_with_a_clear_message():
    with pytest.raises(TypeError, match="does not support torch.jit.script"):
        torch.jit.script(CARAFEPack(8, 2))
    with pytest.raises(TypeError, match="does not support torch.jit.script"):
        torch.jit.script(CARAFE(3, 1, 2))


def test_onnx_submodule_reachable_as_the_readme_writes_it():
    """`import carafe_kernels` then carafe_kernels.onnx.decomposition_table() (it raised AttributeError
    without `import carafe_kernels.onnx`), in a fresh interpreter; the onnx package stays unimported."""
    code = ("import sys, carafe_kernels\n"
            "assert 'carafe_kernels.onnx' not in sys.modules and 'onnx' not in sys.modules\n"
            "table = carafe_kernels.onnx.decomposition_table()\n"
            "assert table and 'onnx' not in sys.modules\n"
            "print(len(table))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0

