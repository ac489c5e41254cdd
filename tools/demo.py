#!/usr/bin/env python
"""Run a detector on images, folders, a video or a webcam. Works with the published detectors by name (--model),
LazyConfig .py and yacs .yaml configs.

    python tools/demo.py --model cascade_mask_rcnn_mvitv2_t_3x --input photos/ --json out.json --output drawn/
    python tools/demo.py --config configs/mvitv2_t_maskrcnn.py --weights model_final.pth \\
        --input photo.jpg 'more/*.jpg' a_folder/ --output out/ --confidence-threshold 0.5
    python tools/demo.py --model vitdet_coco_cascade_mask_rcnn_mvitv2_b_in21k_100ep --video-input in.mp4 --output out.mp4
    python tools/demo.py --model mask_rcnn_mvitv2_t_3x --webcam

--json writes every detection the model returns (its own test score threshold applies) as one COCO file;
--output draws those with score >= --confidence-threshold. Class names come from the detector's dataset (or the
config's registered test dataset; otherwise class indices). Unreadable images, decompression bombs and images too
elongated for the test resize are reported and skipped; the exit code is then 1. Bad arguments exit with 2 before
any model is built.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


PRECISIONS = ("fp32", "bf16", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="NAME", help="a published detector (python -c 'from "
                       "mvit_det.detection.zoo import list_detectors; print(list_detectors())')")  # fmt: skip
    model.add_argument("--config", "--config-file", dest="config_file", metavar="FILE",
                       help="a LazyConfig .py or a yacs .yaml file")  # fmt: skip
    model.add_argument("--exported", metavar="FILE", help="a model.onnx / model.ts written by tools/export_model.py "
                       "(run by mvit_det.detection.export.ExportedPredictor; no config needed)")  # fmt: skip
    p.add_argument("--weights", default=None, help="checkpoint path or URL (default: --model's published weights, "
                   "or the config's train.init_checkpoint / MODEL.WEIGHTS)")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    src.add_argument("--video-input", metavar="FILE", help="a video file")
    src.add_argument("--webcam", nargs="?", type=int, const=0, metavar="INDEX", help="camera index (default 0)")
    p.add_argument("--output", help="folder for drawn PNGs (--input), or the output video file (--video-input)")
    p.add_argument("--json", metavar="OUT.json", help="write the detections as one COCO results file")
    # mvit_det.detection.runner.DRAW_THRESHOLD, written out so that --help needs no detectron2 import
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to draw")
    p.add_argument("--batch-size", type=int, default=1, help="images or frames per model call")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (multi-scale + flip, detectron2's "
                   "GeneralizedRCNNWithTTA defaults)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16 needs CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: key=value (.py, --model) or KEY VALUE (.yaml)")  # fmt: skip
    args = p.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        p.error("--confidence-threshold must be in [0, 1].")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1.")
    if args.exported is not None:  # fixed in the graph; silently ignoring them would mislead
        fixed = [flag for flag, given in (("--weights", args.weights is not None), ("--tta", args.tta),
                                          ("--precision", args.precision != "fp32"),
                                          ("--device", args.device not in (None, "cpu")), ("--opts", args.opts))
                 if given]  # fmt: skip
        if fixed:
            p.error(f"{', '.join(fixed)} cannot change an --exported graph: its weights and test settings were fixed "
                    "when it was exported, and it runs in float32 on the CPU. Re-export with tools/export_model.py "
                    "(its --weights and --opts), or run the config with --config.")  # fmt: skip
    if args.precision == "fp16" and (args.device or "").startswith("cpu"):
        p.error("--precision fp16 needs a CUDA device; on the CPU use --precision bf16.")
    if args.input is not None and args.output is None and args.json is None:
        p.error("--input needs --output DIR and/or --json OUT.json.")
    if args.video_input is not None and args.output is None and args.json is None:
        p.error("--video-input needs --output VIDEO and/or --json OUT.json.")
    if args.model is not None:
        from mvit_det.detection.zoo import get_detector_card

        try:
            get_detector_card(args.model)
        except ValueError as e:
            p.error(str(e))
    return args


def check_outputs(args) -> None:
    """Every output problem is found before the model is built (raises RunError)."""
    from mvit_det.detection.runner import VIDEO_CODECS, check_not_the_input, check_output_dir, check_output_file

    if args.json is not None:
        check_output_file(args.json, "--json", [".json"])
    if args.output is not None:
        if args.input is not None:
            check_output_dir(args.output)
        elif args.video_input is not None:
            check_output_file(args.output, "--output", list(VIDEO_CODECS))
            check_not_the_input(args.output, args.video_input)


def build(args):
    from mvit_det.detection.predictor import build_predictor

    options = dict(batch_size=args.batch_size, precision=args.precision, tta=args.tta)
    if args.exported is not None:  # the exported graph: fixed size, float32, CPU; no TTA
        from mvit_det.detection.export import ExportedPredictor

        return ExportedPredictor(args.exported)
    if args.model is not None:
        from mvit_det.detection.zoo import get_detector

        pretrained = True if args.weights is None else args.weights
        return get_detector(args.model, pretrained=pretrained, device=args.device, opts=args.opts, **options)
    return build_predictor(args.config_file, weights=args.weights, device=args.device, opts=args.opts, **options)


def run_on_images(args, predictor, inputs: list[str], out_paths: dict[str, str]) -> int:
    import cv2
    from tqdm import tqdm

    from mvit_det.detection.runner import CocoResultsWriter, draw_detections, run_images

    coco = CocoResultsWriter(predictor.metadata) if args.json else None
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    failed: list[str] = []

    def on_skip(path: str, reason: str) -> None:
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    def on_result(path: str, bgr, instances) -> None:
        if coco is not None:
            coco.add(path, bgr.shape[0], bgr.shape[1], instances)
        n = int((instances.scores >= args.confidence_threshold).sum())
        if args.output:
            drawn = draw_detections(bgr[:, :, ::-1], instances, predictor.metadata, args.confidence_threshold)
            out = out_paths[path]
            if not cv2.imwrite(out, drawn[:, :, ::-1]):
                tqdm.write(f"failed to write {out}", file=sys.stderr)
                failed.append(path)
                return
            tqdm.write(f"{path}: {n} detections (score >= {args.confidence_threshold}) -> {out}")
        else:
            tqdm.write(f"{path}: {n} detections (score >= {args.confidence_threshold})")

    t0 = time.perf_counter()
    skipped = run_images(predictor, inputs, batch_size=args.batch_size, on_result=on_result, on_skip=on_skip,
                         progress=not args.no_progress)  # fmt: skip
    failed = skipped + failed
    done = len(inputs) - len(failed)
    print(f"{done} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if coco is not None:
        coco.write(args.json)
        print(f"wrote {len(coco.annotations)} detections on {len(coco.images)} images to {args.json}")
    if failed:
        print(f"demo: {len(failed)} of {len(inputs)} inputs failed: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from mvit_det.checkpoint import DownloadError
    from mvit_det.detection.runner import (RunError, check_gui, drawn_output_paths, expand_inputs, open_camera,
                                           open_video, run_video)

    try:
        check_outputs(args)
        inputs: list[str] = []
        out_paths: dict[str, str] = {}
        camera = None
        if args.input is not None:
            inputs = expand_inputs(args.input)
            if not inputs:
                raise RunError("no input images found.")
            if not any(os.path.exists(p) for p in inputs):  # a typo: say so before building (or downloading) a model
                raise RunError(f"no input images found: {', '.join(inputs[:5])} {'does' if len(inputs) == 1 else 'do'} "
                               "not exist.")  # fmt: skip
            out_paths = drawn_output_paths(inputs, args.output) if args.output else {}
        elif args.video_input is not None:
            open_video(args.video_input)[0].release()  # readable, before the model is built
        else:
            check_gui()
            camera = open_camera(args.webcam)
    except RunError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2

    from detectron2.utils.logger import setup_logger

    setup_logger(name="mvit_det")
    try:
        predictor = build(args)
    except (DownloadError, FileNotFoundError, ValueError) as e:
        if camera is not None:
            camera.release()
        print(f"demo: {e}", file=sys.stderr)
        return 2

    if args.input is not None:
        return run_on_images(args, predictor, inputs, out_paths)
    if args.video_input is not None:
        try:
            info = run_video(predictor, args.video_input, args.output, batch_size=args.batch_size,
                             threshold=args.confidence_threshold, json_path=args.json,
                             progress=not args.no_progress)  # fmt: skip
        except RunError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 1
        print(f"{info['frames']} frames ({info['width']}x{info['height']}, {info['fps']:g} fps) -> "
              f"{', '.join(p for p in (args.output, args.json) if p)}")  # fmt: skip
        return 0
    from mvit_det.detection.runner import run_webcam

    shown = run_webcam(predictor, camera, threshold=args.confidence_threshold)
    print(f"webcam: {shown} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
