#!/usr/bin/env python
"""Export a whole Mask R-CNN or Cascade Mask R-CNN (LazyConfig .py or yacs .yaml) to ONNX or TorchScript, and check it.

    python tools/export_model.py --config configs/mvitv2_t_maskrcnn.py --weights model_final.pth \\
        --format onnx --output exported/ [--img-size 1024] [--sample-image photo.jpg]
    python tools/export_model.py --config configs/yacs/mvitv2_t_cascade.yaml --weights model_final.pth \\
        --format torchscript --output exported/ --opts MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.3

Writes OUTPUT/model.onnx or OUTPUT/model.ts and, beside it, model.onnx.json / model.ts.json (input size, channel
order, class names, output names) for ``mvit_det.detection.export.ExportedPredictor`` and ``tools/demo.py
--exported``. The graph takes a fixed --img-size (default 1024x1024): the image is scaled to fit it, aspect ratio
kept, and padded at the bottom and right (see mvit_det/detection/export.py). The detector's test settings (score
threshold, detections per image) are frozen into the graph; change them with --opts.

The export is then run on the sample image (default demo/cat.jpg) and compared with the PyTorch model on the same
input; the largest box, score and mask differences are printed. Beyond the tolerance (box corners 1e-2 px, scores
1e-4, masks 1e-3 of the pixels) or with no detection on either side, the exit status is 1 and nothing is written.
Exit status 2: bad arguments, config or weights. Uses detectron2's TracingAdapter, as detectron2's own
tools/deploy/export_model.py does, which cannot read mvit-det's configs (it calls a bare get_cfg()).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
from mvit_det.utils.cli import parse_img_size  # noqa: E402

DEFAULT_SAMPLE = REPO_ROOT / "demo" / "cat.jpg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="FILE", help="a LazyConfig .py or a yacs .yaml detector config")
    what.add_argument("--model", metavar="ZOO_NAME", help="a detector of the model zoo (mvit_det.detection.zoo)")
    p.add_argument("--weights", help="detector checkpoint (default with --model: the zoo's)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--output", required=True, type=Path, help="folder for the exported file and its .json")
    p.add_argument("--sample-image", type=Path, help=f"image to trace and check on (default {DEFAULT_SAMPLE})")
    p.add_argument("--img-size", dest="hw", type=parse_img_size, default=(1024, 1024),
                   help="SIDE or HxW of the graph's input (default 1024)")  # fmt: skip
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: key=value (.py) or KEY VALUE (.yaml)")  # fmt: skip
    return p.parse_args(argv)


def _zoo_model(name: str, weights: str | None) -> tuple[str, str]:
    """(config path, weights) of a zoo detector (mvit_det.detection.zoo); without --weights its published checkpoint,
    downloaded into the shared cache with the zoo's MD5 check."""
    try:
        from mvit_det.detection.zoo import fetch_checkpoint, get_detector_card
    except ImportError as e:
        raise ValueError(
            f"--model {name} needs mvit_det.detection.zoo, which cannot be imported ({e}); use --config and --weights."
        ) from None
    card = get_detector_card(name)  # ValueError for an unknown name, listing the known ones
    return str(card.config_path), weights or str(fetch_checkpoint(card.url))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        print(f"export_model: --output {args.output} is a file; give a folder (created if needed).", file=sys.stderr)
        return 2
    sample_path = args.sample_image or DEFAULT_SAMPLE
    try:
        import numpy as np

        from mvit_det.data.images import ImageReadError, load_image

        try:
            sample = np.ascontiguousarray(np.asarray(load_image(sample_path))[:, :, ::-1])
        except (ImageReadError, OSError) as e:
            raise ValueError(f"cannot read --sample-image {sample_path}: {e}") from None
        config, weights = args.config, args.weights
        from mvit_det.checkpoint import DownloadError
        from mvit_det.detection.export import ExportCheckError, check_graph_size, export_detector, load_detector

        try:
            if args.model:
                config, weights = _zoo_model(args.model, weights)
            model, classes = load_detector(config, weights, args.opts)
            check_graph_size(model, args.hw)
        except DownloadError as e:
            raise ValueError(str(e)) from None
        if args.format == "onnx":
            try:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
                import onnxruntime  # noqa: F401  (the check)
            except ImportError:
                raise ValueError("ONNX export needs the onnx and onnxruntime packages: pip install onnx onnxruntime")
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"export_model: {str(e).strip(chr(34))}", file=sys.stderr)
        return 2
    info = {"config": str(config), "weights": str(weights), "sample_image": str(sample_path)}
    h, w = args.hw
    print(f"exporting {config} ({args.format}, input {h}x{w}) ...", flush=True)
    try:
        path, diffs = export_detector(model, args.format, args.output, sample, args.hw, classes, args.opset, info)
    except ExportCheckError as e:
        print(f"export_model: error: {e} Nothing was written.", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as e:  # tracing or the exporter refused an op: say so in one line
        print(f"export_model: the {args.format} export failed, nothing was written: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)  # fmt: skip
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB) and {path.name}.json in {diffs['export_seconds']:.1f} s")
    print(
        f"check on {sample_path} ({diffs['detections']} detections): largest differences to PyTorch: boxes "
        f"{diffs['box_px']:.2e} px, scores {diffs['score']:.2e}, masks {diffs['mask_frac']:.2e} of the pixels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
