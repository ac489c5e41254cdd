#!/usr/bin/env python
"""End-to-end demo on a CPU: pre-train the trunk -> toy data -> evaluate untrained -> train -> evaluate -> visualise.

    python tools/main_job.py                       # what `make demo` runs
    python tools/main_job.py --iters 100           # shorter
    python tools/main_job.py --pretrain-epochs 0   # detector from random initialisation, no pre-training
    python tools/main_job.py --output-dir /tmp/run

Steps:
1. pre-train the MViTv2-T trunk as a classifier, the role ImageNet plays in the COCO recipe: no ImageNet weights can
   be downloaded here, so ``mvit_det.classification.train`` trains it on scikit-learn's handwritten digits (1438
   32x32 images, shipped with scikit-learn; recipe ``configs/classification/digits_tiny.yaml``) for
   ``--pretrain-epochs`` epochs. A finished pre-training in the output dir is reused, an interrupted one resumes;
2. load the built-in toy shapes dataset (``mvit_toy_train``/``mvit_toy_val``, registered by ``import mvit_det.detection``,
   generated on first use);
3. build Mask R-CNN with an MViTv2-T backbone from ``configs/toy/mvitv2_t_maskrcnn_toy.py`` and evaluate box and
   mask AP on the toy val set before training (random weights);
4. train for ``--iters`` iterations from the digits classifier (``train.init_checkpoint``; the rel-pos tables are
   interpolated from its 32x32 input, ``pretrain_img_size=32``), as ``lazyconfig_train_net.py`` would with
   those two overrides; checkpoints, metrics.json and TensorBoard events go to the output dir;
5. evaluate again, run ``LazyPredictor`` with the saved ``model_final.pth`` on the first ``--num-vis`` val
   images and write each as a PNG: ground truth on the left, detections on the right (where boxes of different
   classes overlap, the best-scoring one; ``--draw-all-classes`` draws them all, as the evaluation counts them);
6. print a summary and write ``summary.json``. The exit code is 1 if training did not raise box AP.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

if __package__:  # imported as tools.main_job (the tests)
    from .openmp_policy import choose_before_torch
else:  # run as a script: tools/ is on sys.path
    from openmp_policy import choose_before_torch

OMP_CHOICE = choose_before_torch()  # before the imports below load torch, and with it OpenMP
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402
from torchvision.ops import nms  # noqa: E402

from mvit_det.classification.train import TrainConfig, train  # noqa: E402
from mvit_det.data.digits import write_digits  # noqa: E402
from mvit_det.data.images import load_image  # noqa: E402
from mvit_det.detection.builders import build_model
from mvit_det.detection.engine import do_test, do_train, setup_run
from mvit_det.detection.run_config import is_lazy, load_config, prepare_config, run_settings
from mvit_det.detection.predictor import LazyPredictor  # noqa: E402
from mvit_det.detection.runner import DRAW_THRESHOLD  # noqa: E402
from mvit_det.utils.malloc import keep_freed_memory  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "toy", "mvitv2_t_maskrcnn_toy.py")
DIGITS_RECIPE = os.path.join(REPO, "configs", "classification", "digits_tiny.yaml")
DIGITS_SIZE = 32  # the digits recipe's input size; the detector's rel-pos tables are interpolated from it
# The 32x32 digits cost the loader little: on 2 CPUs a loader process only competes with the training threads
# (idle 2-vCPU machine: 143 images/s without one, 126 with one).
PRETRAIN_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="LazyConfig to train (default: the toy config)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the config's train.max_iter)")
    p.add_argument("--output-dir", default=os.path.join("output", "main_job"))
    p.add_argument(
        "--pretrain-epochs", type=int, default=6,
        help="epochs of digits classification that initialise the trunk (0: random initialisation)",
    )
    p.add_argument(
        "--confidence-threshold", type=float, default=DRAW_THRESHOLD,
        help="score threshold for the drawn detections only, detectron2's demo default (the evaluation counts every "
             "detection; 0.3 also draws the weaker partial boxes on parts of shapes)",
    )
    p.add_argument("--num-vis", type=int, default=4, help="val images to draw (ground truth | prediction)")
    p.add_argument(
        "--draw-all-classes", action="store_true",
        help="draw every class's box above the threshold (default: the best-scoring one where boxes of different "
             "classes overlap; the evaluation always counts them all)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra key=value config overrides")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        p.error("--iters must be >= 1.")
    if args.pretrain_epochs < 0:
        p.error("--pretrain-epochs must be >= 0.")
    if args.num_vis < 0:
        p.error("--num-vis must be >= 0.")
    return args


def shown_detections(instances: Instances, threshold: float, all_classes: bool = False) -> Instances:
    """The detections to draw: score >= threshold and, unless ``all_classes``, only the best-scoring box where boxes
    of different classes overlap (IoU > 0.5). The detector's own NMS is per class, so one shape can keep a box for
    each class; AP counts those, the drawing shows the detector's answer per object."""
    shown = instances[instances.scores >= threshold]
    if all_classes or len(shown) == 0:
        return shown
    keep = nms(shown.pred_boxes.tensor, shown.scores, 0.5)
    return shown[keep]


def _visualise(
    predictor: LazyPredictor, record: dict, out_dir: str, threshold: float, all_classes: bool
) -> tuple[str, int]:
    """Write the ground truth (left) and the detections to draw (right) of one image as a PNG."""
    rgb = np.asarray(load_image(record["file_name"]))
    instances = predictor(rgb[:, :, ::-1].copy())["instances"].to("cpu")
    shown = shown_detections(instances, threshold, all_classes)
    panels = [
        Visualizer(rgb, predictor.metadata, scale=2.0).draw_dataset_dict(record).get_image(),
        Visualizer(rgb, predictor.metadata, scale=2.0, instance_mode=ColorMode.IMAGE)
        .draw_instance_predictions(shown)
        .get_image(),
    ]
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    png = os.path.join(out_dir, f"prediction_{os.path.splitext(os.path.basename(record['file_name']))[0]}.png")
    cv2.imwrite(png, np.concatenate([panels[0], gap, panels[1]], axis=1)[:, :, ::-1])
    return png, len(shown)


def _ap(results: dict, dataset: str, task: str, key: str = "AP") -> float:
    return float(results.get(dataset, {}).get(task, {}).get(key, float("nan")))


def pretrain_trunk(out_dir: str, epochs: int) -> dict:
    """Train MViTv2-T on the digits (step 1); return cls training's summary plus the data counts and seconds.

    ``resume=True`` makes a rerun continue an interrupted pre-training, or only re-save a finished one.
    """
    t0 = time.perf_counter()
    data = write_digits(os.path.join(out_dir, "data"), size=DIGITS_SIZE, val_fraction=0.2)
    summary = train(TrainConfig(
        data=data["train_dir"], val_data=data["val_dir"], output=os.path.join(out_dir, "train"),
        model="mvitv2-tiny_3rdparty_in1k", pretrained="none", config=DIGITS_RECIPE, overrides={"epochs": epochs},
        resume=True, workers=PRETRAIN_WORKERS, progress=False,
    ))  # fmt: skip
    return {**summary, "data": data, "seconds": time.perf_counter() - t0}


def config_overrides(args: argparse.Namespace, pretrain_dir: str) -> list[str]:
    """The detector config's overrides: output dir, the pre-trained trunk (unless --pretrain-epochs 0), --iters, and
    last the user's own ``key=value`` pairs, which win."""
    opts = [f"train.output_dir={args.output_dir}"]
    if args.pretrain_epochs:
        weights = os.path.join(pretrain_dir, "train", "model_final.pth")
        opts += [f"train.init_checkpoint={weights}", f"model.backbone.bottom_up.pretrain_img_size={DIGITS_SIZE}"]
    if args.iters is not None:
        opts.append(f"train.max_iter={args.iters}")
    return opts + list(args.opts)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    cfg = load_config(args.config, config_overrides(args, pretrain_dir))
    setup_run(cfg, argparse.Namespace(config_file=args.config, eval_only=False, main_job=vars(args)))
    log = logging.getLogger("mvit_det.main_job")
    log.info("OpenMP: %s", OMP_CHOICE)
    malloc_choice = keep_freed_memory()
    log.info("%s", malloc_choice)

    pre = None
    if args.pretrain_epochs:
        pre = pretrain_trunk(pretrain_dir, args.pretrain_epochs)
        log.info("Trunk pre-trained on %d digits in %.0f s: held-out top-1 %.2f%%", pre["train_images"],
                 pre["seconds"], pre["val_top1"])
        # Re-seed as default_setup did, so that the detector does not depend on how many random numbers the
        # pre-training drew (none when a finished one is reused): the same command gives the same detector.
        seed = int(cfg.train.seed) if is_lazy(cfg) else int(cfg.SEED)
        seed_all_rng(None if seed < 0 else seed + comm.get_rank())
    cfg = prepare_config(cfg)
    s = run_settings(cfg)
    val = s.test_datasets[0]
    t0 = time.perf_counter()
    num_images = {name: len(DatasetCatalog.get(name)) for name in s.train_datasets + s.test_datasets}
    log.info("Datasets ready in %.1f s (the toy set is generated on first use): %s", time.perf_counter() - t0, num_images)

    model = build_model(cfg)  # random weights; do_train loads train.init_checkpoint (the digits trunk) into it
    t0 = time.perf_counter()
    before = do_test(cfg, model)
    t_eval_before = time.perf_counter() - t0

    t0 = time.perf_counter()
    after = do_train(cfg, resume=False, model=model)
    t_train = time.perf_counter() - t0  # includes the final evaluation

    # Predict with the saved checkpoint, as a user would.
    final = os.path.join(s.output_dir, "model_final.pth")
    predictor = LazyPredictor(cfg, weights=final, device=s.device)
    pngs, n_shown = [], 0
    for record in DatasetCatalog.get(val)[: args.num_vis]:
        png, shown = _visualise(predictor, record, s.output_dir, args.confidence_threshold, args.draw_all_classes)
        pngs.append(png)
        n_shown += shown

    summary = {
        "config": args.config,
        "iterations": s.max_iter,
        "batch_size": int(cfg.dataloader.train.total_batch_size),
        "init": (f"MViTv2-T trunk from {pre['epoch']} epochs of "
                 f"digits classification (held-out top-1 {pre['val_top1']:.2f}%)") if pre else "random",
        "pretrain_s": round(pre["seconds"], 1) if pre else 0.0,
        "device": s.device,
        "openmp": OMP_CHOICE,
        "malloc": malloc_choice,
        "box_AP_before": _ap(before, val, "bbox"),
        "mask_AP_before": _ap(before, val, "segm"),
        "box_AP_after": _ap(after, val, "bbox"),
        "mask_AP_after": _ap(after, val, "segm"),
        "box_AP50_after": _ap(after, val, "bbox", "AP50"),
        "mask_AP50_after": _ap(after, val, "segm", "AP50"),
        "eval_before_s": round(t_eval_before, 1),
        "train_and_eval_s": round(t_train, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
        "detections_shown": n_shown,
        "files": {
            "visualisations": pngs,
            "checkpoint": final,
            "metrics": os.path.join(s.output_dir, "metrics.json"),
            "log": os.path.join(s.output_dir, "log.txt"),
        },
    }
    with open(os.path.join(s.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    learned = summary["box_AP_after"] > summary["box_AP_before"] + 1.0
    print("\n==== mvit-det main job summary ====")
    print(f"model        : Mask R-CNN, MViTv2-T backbone, {s.device}; init: {summary['init']}")
    print(f"training     : {s.max_iter} iterations at batch {summary['batch_size']} on {num_images[s.train_datasets[0]]} toy images")
    print(f"box  AP      : {summary['box_AP_before']:6.2f} (untrained) -> {summary['box_AP_after']:6.2f} (trained), AP50 {summary['box_AP50_after']:.2f}")
    print(f"mask AP      : {summary['mask_AP_before']:6.2f} (untrained) -> {summary['mask_AP_after']:6.2f} (trained), AP50 {summary['mask_AP50_after']:.2f}")
    print(f"wall time    : {summary['total_s']:.0f} s (pre-training {summary['pretrain_s']:.0f} s, eval before {summary['eval_before_s']:.0f} s, train + eval {summary['train_and_eval_s']:.0f} s)")
    per_object = "" if args.draw_all_classes else ", the best class where boxes overlap"
    print(f"visualisation: {len(pngs)} val images, ground truth | prediction, in {s.output_dir}/prediction_*.png "
          f"({n_shown} detections with score >= {args.confidence_threshold}{per_object})")  # fmt: skip
    print(f"checkpoint   : {final}")
    print(f"metrics      : {summary['files']['metrics']} (TensorBoard: tensorboard --logdir {s.output_dir})")
    print(f"summary      : {os.path.join(s.output_dir, 'summary.json')}")
    if not learned:
        print("FAILED: training did not raise box AP by more than 1 point.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
