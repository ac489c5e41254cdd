#!/usr/bin/env python
"""Export an MViTv2 classifier or detection backbone to ONNX at a fixed input size, and check it.

    python tools/export_onnx.py --output mvitv2_t.onnx                          # MViTv2-T classifier, 224x224
    python tools/export_onnx.py --model mvitv2-base_3rdparty_in1k --weights b.pth --output b.onnx
    python tools/export_onnx.py --backbone tiny --weights model_final.pth --img-size 1024 --output trunk.onnx

The classifier outputs ``logits`` (B, num_classes); the backbone outputs ``scale2``..``scale5``
(B, C * 2^i, H / 4 / 2^i, W / 4 / 2^i). The graph is traced at ``--img-size`` (the rel-pos tables are resized for
that size while tracing), so export at the size you will run; the batch dimension stays dynamic. ``--weights``
takes any format ``mvit_det.load_checkpoint`` reads (official, timm, mmpretrain, detectron2, mvit-det); without it
a classifier uses the published checkpoint and a backbone stays randomly initialised (with a warning).

Exit status 2 when the weights cannot be read or downloaded (offline, pass a local ``--weights`` file).
When onnxruntime is installed, the exported file is run on a random batch and compared with PyTorch (the maximum
difference relative to the largest output is printed; above 1e-4 is an error, exit status 1).
Uses PyTorch's TorchScript-based exporter (``dynamo=False``): the torch.export-based one does not yet handle
the strides of the decomposed ``scaled_dot_product_attention`` in this model.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
import torch
from torch import nn

from mvit_det import get_model, list_models
from mvit_det.checkpoint import DownloadError, load_checkpoint
from mvit_det.utils.atomic import atomic_path
from mvit_det.utils.cli import parse_img_size
from mvit_det.utils.numerics import max_rel_diff

TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", default="mvitv2-tiny_3rdparty_in1k", choices=list_models(), metavar="NAME",
                      help="classifier to export (see mvit_det.list_models())")  # fmt: skip
    what.add_argument("--backbone", metavar="SIZE", help="export the detection trunk of this size (tiny/small/...)")
    p.add_argument("--weights", help="checkpoint file or URL (any supported format)")
    p.add_argument("--img-size", dest="hw", type=parse_img_size, default=(224, 224),
                   help="SIDE or HxW the graph is traced at (default 224)")  # fmt: skip
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[nn.Module, list[str]]:
    """The model to export (eval mode) and its output names."""
    if args.backbone:
        from mvit_det.detection import MViTv2Backbone

        model = MViTv2Backbone(args.backbone).eval()
        if args.weights:
            load_checkpoint(model, args.weights)
        else:
            print("warning: no --weights, so the backbone is RANDOMLY initialised", file=sys.stderr)
        return model, list(model.output_shape())
    model = get_model(args.model, pretrained=args.weights or True)
    return model, ["logits"]


def export(model: nn.Module, output_names: list[str], hw: tuple[int, int], path: Path, opset: int = 18) -> None:
    """Write ``model`` as ONNX, traced on a (1, 3, H, W) input, with a dynamic batch dimension."""
    dynamic = {"images": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    # Atomic: a failed or interrupted export (full disk, Ctrl-C) leaves neither a half-written .onnx nor a temp file.
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed at the traced size on purpose
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose (see top)
        torch.onnx.export(
            model, (torch.zeros(1, 3, *hw),), str(tmp), input_names=["images"], output_names=output_names,
            dynamic_axes=dynamic, opset_version=opset, dynamo=False,
        )  # fmt: skip


def check_with_onnxruntime(model: nn.Module, path: Path, hw: tuple[int, int], batch: int = 2) -> dict[str, float]:
    """Max |onnx - torch| / max |torch| per output, on a random batch (batch size other than the traced one)."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    ref = {"logits": ref} if torch.is_tensor(ref) else ref
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"images": x.numpy()})
    names = [o.name for o in session.get_outputs()]
    return {n: max_rel_diff([torch.from_numpy(o)], [ref[n]]) for n, o in zip(names, outs)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output.is_dir():  # checked before the model is built
        print(f"export_onnx: --output {args.output} is a folder; give the file to write, e.g. "
              f"{args.output / 'model.onnx'}", file=sys.stderr)  # fmt: skip
        return 2
    if args.output.suffix.lower() != ".onnx":  # a typo must not replace an image or a checkpoint
        print(f"export_onnx: --output {args.output}: the file to write must end in .onnx, e.g. "
              f"{args.output.with_suffix('.onnx')}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        model, output_names = build(args)
    except (OSError, DownloadError, ValueError, KeyError) as e:  # unreadable or mismatched weights; offline
        print(f"export_onnx: {e}", file=sys.stderr)
        return 2
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        print("export_onnx: the onnx package is missing: pip install onnx onnxruntime", file=sys.stderr)
        return 2
    try:
        export(model, output_names, args.hw, args.output, args.opset)
    except OSError as e:  # full disk, unwritable folder: nothing is left behind
        print(f"export_onnx: could not write {args.output}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MB), input images: (batch, 3, "
          f"{args.hw[0]}, {args.hw[1]}), outputs: {', '.join(output_names)}")  # fmt: skip
    try:
        diffs = check_with_onnxruntime(model, args.output, args.hw)
    except ImportError:
        print("onnxruntime is not installed: the exported graph was not checked (pip install onnxruntime)")
        return 0
    worst = max(diffs.values())
    print("onnxruntime vs PyTorch, max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if worst > TOLERANCE:
        print(f"error: the ONNX graph differs from PyTorch by {worst:.1e} > {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
