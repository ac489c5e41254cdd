#!/usr/bin/env python
"""FLOPs, activations, parameters and structure of a detector, as detectron2's tools/analyze_model.py reports them,
for mvit-det's configs of both kinds (.py and .yaml) and without COCO.

    python tools/analyze_model.py --config configs/mvitv2_t_maskrcnn.py --tasks flop parameter activation structure
    python tools/analyze_model.py --config configs/yacs/mvitv2_t_cascade.yaml --tasks flop --inputs photo.jpg
    python tools/analyze_model.py --model cascade_mask_rcnn_mvitv2_b_3x --tasks flop
    python tools/analyze_model.py --zoo --json zoo_flops.json    # the zoo table's counted FLOPs column

detectron2's own tool counts with ``detectron2.utils.analysis.FlopCountAnalysis`` on its test loader's images
(COCO val); this one uses the same counter on real photographs (``--inputs`` files, or scikit-image's bundled
photographs by default) passed through the config's own test mapper, so they are resized as the test loader
resizes. Weights are random unless --weights is given: the box heads' cost does not depend on them (they run on the
RPN's 1000 proposals), the mask head's does (it runs on the final detections), so the FLOP count is reported both
for no detection and for the most detections the config allows (score threshold 0 while counting). FLOPs are
fvcore's: one multiply-accumulate counts as one. --zoo counts every zoo detector that detectron2 publishes a FLOP
count for, on the zoo's input (mvit_det.detection.analysis.ZOO_INPUTS), and prints the zoo table's values.
Exit status 2: bad arguments or config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TASKS = ("flop", "activation", "parameter", "structure")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="FILE", help="a LazyConfig .py or a yacs .yaml detector config")
    what.add_argument("--model", metavar="ZOO_NAME", help="a detector of the model zoo (its config, random weights)")
    what.add_argument("--zoo", action="store_true", help="count every zoo detector with a published FLOP count")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["flop"])
    p.add_argument("--inputs", nargs="+", metavar="IMG",
                   help="image files, or names of scikit-image photographs (default: astronaut coffee chelsea rocket; "
                        "with --zoo: the zoo's input)")  # fmt: skip
    p.add_argument("-n", "--num-inputs", type=int, help="use only the first N inputs")
    p.add_argument("--weights", help="checkpoint to load (default: random weights)")
    p.add_argument("--json", metavar="FILE", help="also write the FLOP counts here")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: key=value (.py) or KEY VALUE (.yaml)")  # fmt: skip
    return p.parse_args(argv)


def _images(names):
    """(name, RGB uint8) for files and scikit-image photograph names."""
    from detectron2.data.detection_utils import read_image

    from mvit_det.detection.analysis import photographs

    out = []
    for name in names:
        if os.path.isfile(name):
            out.append((name, np.ascontiguousarray(read_image(name, format="RGB"))))
        else:
            try:
                out += photographs([name])
            except AttributeError:
                raise ValueError(f"--inputs {name}: no such file, and not a scikit-image photograph") from None
    return out


def _flop(name: str, cfg, model, images, log) -> dict:
    from mvit_det.detection.analysis import by_operator, count_flops, test_inputs

    t0 = time.perf_counter()
    counts = count_flops(model, test_inputs(cfg, images), all_detections=True)
    most = max(c.detections for c in counts)
    low = [c.total_with(0) / 1e9 for c in counts]
    high = [c.total / 1e9 for c in counts]
    for c in counts:
        log(f"  {c.image}: input {c.input_hw[0]}x{c.input_hw[1]}, {c.total_with(0) / 1e9:.1f} GFLOPs with no "
            f"detection, {c.total / 1e9:.1f} with {c.detections} (mask head {c.mask_head_per_detection / 1e9:.3f} "
            f"per detection), box head(s) on {c.proposals} RoIs")  # fmt: skip
    ops = {k: round(v / 1e9, 3) for k, v in by_operator(counts).items()}
    log(f"  GFLOPs per operator (mean, {most} detections): {ops}")
    log(f"{name}: total GFLOPs {np.mean(low):.1f}±{np.std(low):.1f} with no detection, "
        f"{np.mean(high):.1f}±{np.std(high):.1f} with {most} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return {
        "gflops_no_detection": round(float(np.mean(low)), 1),
        "gflops_max_detections": round(float(np.mean(high)), 1),
        "max_detections": most,
        "inputs": [{"image": c.image, "input_hw": list(c.input_hw), "proposals": c.proposals,
                    "gflops_no_detection": c.total_with(0) / 1e9, "gflops": c.total / 1e9,
                    "mask_head_gflops_per_detection": c.mask_head_per_detection / 1e9} for c in counts],
        "gflops_by_operator": ops,
    }  # fmt: skip


def analyze(name: str, config: str, args, images, log=print) -> dict:
    from detectron2.utils.analysis import parameter_count_table

    from mvit_det.detection.analysis import build_for_counting, count_activations, test_inputs

    cfg, model = build_for_counting(config, args.opts, args.weights)
    result: dict = {"config": config}
    for task in args.tasks:
        if task == "flop":
            result["flop"] = _flop(name, cfg, model, images, log)
        elif task == "activation":
            acts = count_activations(model, test_inputs(cfg, images))
            result["mactivations"] = acts
            log(f"{name}: total (million) activations {np.mean(acts):.1f}±{np.std(acts):.1f}")
        elif task == "parameter":
            log("Parameter count:\n" + parameter_count_table(model, max_depth=5))
            result["parameters"] = sum(p.numel() for p in model.parameters())
        else:
            log("Model structure:\n" + str(model))
    return result


def _zoo_targets() -> dict[str, str]:
    """Zoo names with a published FLOP count -> config."""
    from mvit_det.detection.zoo import DETECTORS

    return {n: str(c.config_path) for n, c in DETECTORS.items() if c.published_gflops is not None}


def _model_key(config: str, opts) -> str:
    """The model part of a config as text: equal texts build the same network (B and B-in21k differ only in their
    ImageNet checkpoint), which is then counted once."""
    from omegaconf import OmegaConf

    from mvit_det.detection.run_config import is_lazy, load_config

    cfg = load_config(config, opts)
    return OmegaConf.to_yaml(cfg.model) if is_lazy(cfg) else cfg.MODEL.dump()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_inputs is not None and args.num_inputs < 1:
        print("analyze_model: --num-inputs must be >= 1", file=sys.stderr)
        return 2
    from mvit_det.detection.analysis import PHOTOGRAPHS, ZOO_INPUTS

    try:
        images = _images(args.inputs or (ZOO_INPUTS if args.zoo else PHOTOGRAPHS))[: args.num_inputs]
        if args.zoo:
            targets = _zoo_targets()
        elif args.model:
            from mvit_det.detection.zoo import get_detector_card

            targets = {args.model: str(get_detector_card(args.model).config_path)}
        else:
            if not os.path.isfile(args.config):
                raise ValueError(f"config {args.config} does not exist")
            targets = {args.config: args.config}
    except ValueError as e:
        print(f"analyze_model: {e}", file=sys.stderr)
        return 2
    results, seen = {}, {}
    for name, config in targets.items():
        try:
            key = _model_key(config, args.opts)
            if key in seen:
                results[name] = dict(results[seen[key]], config=config, same_model_as=seen[key])
                continue
            results[name] = analyze(name, config, args, images)
        except (ValueError, FileNotFoundError) as e:
            print(f"analyze_model: {name}: {e}", file=sys.stderr)
            return 2
        seen[key] = name
    if args.zoo:
        from mvit_det.detection.zoo import DETECTORS

        print("\nname | published | counted (no detection - 100 detections)")
        for name, r in results.items():
            f = r.get("flop")
            if f:
                print(f"{name} | {DETECTORS[name].published_gflops:.0f}G | "
                      f"{f['gflops_no_detection']:.0f}-{f['gflops_max_detections']:.0f}G")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
