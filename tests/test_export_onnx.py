"""tools/export_onnx.py: the exported graphs compute what the PyTorch models compute (checked with
onnxruntime at a batch size other than the traced one), and bad weights give a clear error."""
from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from mvit_det.checkpoint import save_checkpoint
from mvit_det.detection import MViTv2Backbone
from mvit_det.models import MViTv2
from benchmarks.references import randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export_onnx  # noqa: E402


def _run_onnx(path: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"images": x.numpy()})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outs)}


def test_classifier_export_matches_pytorch(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_(MViTv2("tiny")).eval()
    weights = save_checkpoint(model, tmp_path / "t.pth")
    out = tmp_path / "cls.onnx"
    rc = export_onnx.main(["--model", "mvitv2-tiny_3rdparty_in1k", "--weights", str(weights),
                           "--img-size", "96", "--output", str(out)])  # fmt: skip
    assert rc == 0 and out.is_file() and not list(tmp_path.glob("*.tmp"))
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    got = _run_onnx(out, x)["logits"]
    assert got.shape == (3, 1000)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_backbone_export_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = randomize_(MViTv2Backbone("tiny")).eval()
    out = tmp_path / "trunk.onnx"
    export_onnx.export(model, list(model.output_shape()), (128, 160), out)
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        ref = model(x)
    got = _run_onnx(out, x)
    assert list(got) == ["scale2", "scale3", "scale4", "scale5"]
    for name, r in ref.items():
        torch.testing.assert_close(got[name], r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=name)


def test_bad_weights_and_sizes_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert export_onnx.main(["--backbone", "tiny", "--weights", str(bad), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export_onnx: ") and "bad.pth" in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--img-size", "16", "--output", str(tmp_path / "y.onnx")])
    assert exit_info.value.code == 2 and ">= 32" in capsys.readouterr().err
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"a photo")
    assert export_onnx.main(["--output", str(photo)]) == 2  # a typo must not replace the photo
    assert "must end in .onnx, e.g. " + str(tmp_path / "photo.onnx") in capsys.readouterr().err
    assert photo.read_bytes() == b"a photo"
