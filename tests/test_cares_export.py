"""`cares export --format onnx`: a checkpoint becomes an ONNX model with dynamic batch and spatial size
that onnxruntime runs and that matches PyTorch."""
import pytest
import torch

from cares.checkpoint import FORMAT, VERSION, build_model_from_checkpoint, input_record, save_checkpoint
from cares.cli import main
from cares.models import build_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _checkpoint(path, image_size=32):
    torch.manual_seed(0)
    options = {"base_channels": 4}
    model = build_model("cares_unet", **options)
    state = {"format": FORMAT, "version": VERSION, "epoch": 1,
             "model": {"name": "cares_unet", "options": options, "in_channels": 1, "num_classes": 1,
                       "state_dict": model.state_dict()},
             "input": input_record(image_size)}
    save_checkpoint(path, state)
    return state


def test_export_onnx_runs_in_onnxruntime_with_dynamic_shapes(tmp_path, capsys):
    state = _checkpoint(tmp_path / "best.pt")
    out = tmp_path / "model" / "cares.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max relative error" in printed and "multiples of 16" in printed and out.is_file()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    model = build_model_from_checkpoint(state)
    x = torch.randn(3, 1, 48, 80)  # another batch and size than the checkpoint's 32x32
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_export_rejects_a_file_that_is_no_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    assert main(["export", "--checkpoint", str(bogus), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a cares checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
