#!/usr/bin/env python
"""Run a detector on images and save the drawn detections as PNGs. Works with LazyConfig and yacs configs.

    python tools/demo.py --config configs/mvitv2_t_maskrcnn.py --weights model_final.pth \\
        --input photo.jpg more/*.jpg a_folder/ --output out/ --confidence-threshold 0.5
    python tools/demo.py --config configs/yacs/mvitv2_t_maskrcnn.yaml --weights model_final.pth --input img.jpg --output out/

Class names come from the config's test dataset when it is registered (or is the built-in toy set); otherwise
detections are labelled by class index. An unreadable or corrupt input is reported and skipped; the exit code is 1
if any input failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE",
                   help="a LazyConfig .py or a yacs .yaml file")
    p.add_argument("--weights", default=None,
                   help="checkpoint (default: the config's train.init_checkpoint / MODEL.WEIGHTS)")
    p.add_argument("--input", nargs="+", required=True, help="image files, glob patterns or directories")
    p.add_argument("--output", required=True, help="directory for the PNGs")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to draw")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: key=value (.py) or KEY VALUE (.yaml)")
    args = p.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        p.error("--confidence-threshold must be in [0, 1].")
    return args


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, directories as their image files (sorted), glob patterns expanded. Missing paths are kept
    so that they are reported as failures."""
    out: list[str] = []
    for item in items:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        elif any(c in path for c in "*?[") and not os.path.exists(path):
            out += sorted(glob.glob(path)) or [path]
        else:
            out.append(path)
    return out


def _output_name(path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    name, k = f"{stem}.png", 1
    while name in used:  # two inputs with the same file name
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from mvit_det.data.images import ImageReadError, load_image
    from mvit_det.detection.predictor import build_predictor

    setup_logger(name="mvit_det")
    inputs = expand_inputs(args.input)
    if not inputs:
        print("demo: no input images found.", file=sys.stderr)
        return 1
    predictor = build_predictor(args.config_file, weights=args.weights, device=args.device, opts=args.opts)
    os.makedirs(args.output, exist_ok=True)

    failed, used = [], set()
    for path in inputs:
        try:
            rgb = np.asarray(load_image(path))
        except (ImageReadError, OSError) as e:  # missing, unreadable, truncated or not an image
            print(f"skipped {path}: {e}", file=sys.stderr)
            failed.append(path)
            continue
        t0 = time.perf_counter()
        instances = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"].to("cpu")
        dt = time.perf_counter() - t0
        shown = instances[instances.scores >= args.confidence_threshold]
        vis = Visualizer(rgb, predictor.metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(shown)
        out = os.path.join(args.output, _output_name(path, used))
        if not cv2.imwrite(out, vis.get_image()[:, :, ::-1]):
            print(f"failed to write {out}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: {len(shown)} detections (score >= {args.confidence_threshold}) in {dt:.2f} s -> {out}")
    if failed:
        print(f"demo: {len(failed)} of {len(inputs)} inputs failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
