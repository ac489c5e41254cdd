#!/usr/bin/env python
"""Train or evaluate an MViTv2 detector from a LazyConfig (``.py``) or a yacs (``.yaml``) config.

Examples::

    # train (LazyConfig); key=value overrides
    python tools/train_net.py --config configs/mvitv2_t_maskrcnn.py --num-gpus 8 dataloader.train.total_batch_size=16
    # train on your own COCO-format data (3 classes)
    python tools/train_net.py --config configs/mvitv2_t_maskrcnn.py \
        --register-coco my_train train.json train_images/ --register-coco my_val val.json val_images/ \
        dataloader.train.dataset.names=my_train dataloader.test.dataset.names=my_val model.roi_heads.num_classes=3
    # train (yacs); overrides as KEY VALUE pairs or KEY=VALUE
    python tools/train_net.py --config-file configs/yacs/mvitv2_t_maskrcnn.yaml SOLVER.IMS_PER_BATCH 16
    # continue an interrupted run from <output_dir>/last_checkpoint
    python tools/train_net.py --config configs/mvitv2_t_maskrcnn.py --resume
    # evaluate a checkpoint
    python tools/train_net.py --config configs/mvitv2_t_maskrcnn.py --eval-only train.init_checkpoint=model.pth
    python tools/train_net.py --config configs/yacs/mvitv2_t_maskrcnn.yaml --eval-only MODEL.WEIGHTS model.pth

``--num-gpus N`` starts N processes per machine. Without CUDA they run on the CPU and talk through the gloo backend
(useful for testing); with CUDA they use NCCL, one GPU each.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys


import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from mvit_det.checkpoint import CheckpointFileError
from mvit_det.detection.builders import build_model
from mvit_det.detection.checkpoint import MViTv2Checkpointer
from mvit_det.detection.engine import NonFiniteLossError, do_test, do_train, register_coco_datasets, setup_run
from mvit_det.detection.resume import OutputDirLockedError, output_dir_lock, resume_hint
from mvit_det.detection.run_config import check_run_settings, load_config, prepare_config, run_settings
from mvit_det.utils.malloc import keep_freed_memory

EXIT_NONFINITE = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE",
                   help="a LazyConfig .py or a yacs .yaml file")
    p.add_argument("--eval-only", action="store_true", help="evaluate the initial (or, with --resume, last) weights")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/last_checkpoint if it exists (weights, optimizer, iteration)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (0 .. num_machines-1)")
    p.add_argument("--dist-url", default="auto",
                   help="rendezvous URL, e.g. tcp://10.0.0.1:29500; 'auto' picks a free local port (one machine)")
    p.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format dataset under NAME before training (repeatable); then point the "
                        "config at it, e.g. dataloader.train.dataset.names=NAME or DATASETS.TRAIN \"('NAME',)\"")
    p.add_argument("opts", nargs="*", default=[],
                   help="overrides: key=value (LazyConfig) or KEY VALUE / KEY=VALUE (yacs); may be mixed with flags")
    args = p.parse_intermixed_args(argv)
    if args.num_gpus < 1 or args.num_machines < 1:
        p.error("--num-gpus and --num-machines must be >= 1.")
    if not 0 <= args.machine_rank < args.num_machines:
        p.error(f"--machine-rank must be in [0, {args.num_machines - 1}].")
    if args.num_machines > 1 and args.dist_url == "auto":
        p.error("--dist-url auto works on one machine only; give tcp://<rank-0 host>:<port> for several machines.")
    if torch.cuda.is_available() and args.num_gpus > torch.cuda.device_count():
        p.error(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return args


def setup(args: argparse.Namespace):
    register_coco_datasets(args.register_coco)
    cfg = load_config(args.config_file, args.opts)
    if not torch.cuda.is_available() and comm.get_world_size() > 1:
        # N CPU processes share the machine; without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    setup_run(cfg, args)
    return prepare_config(cfg)


def main(args: argparse.Namespace):
    results = run(args)
    if comm.get_world_size() > 1:
        # Leave together: a rank that exits while another is still finishing its last collective closes the
        # gloo connection under it, and that rank then aborts (SIGABRT) although the job succeeded.
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return results


def run(args: argparse.Namespace):
    cfg = setup(args)
    logger = logging.getLogger("mvit_det.train_net")
    try:
        if args.eval_only:
            s = run_settings(cfg)
            model = build_model(cfg)
            # Evaluation needs every weight from the checkpoint: a layer left at its initialisation is an error.
            checkpointer = MViTv2Checkpointer(model, s.output_dir, require_all=True)
            checkpointer.resume_or_load(s.init_checkpoint, resume=args.resume)
            return do_test(cfg, model)
        logger.info("%s", keep_freed_memory())
        return do_train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        logger.error("%s", e)
        sys.exit(EXIT_NONFINITE)
    except CheckpointFileError as e:  # the message names the file and the fix; a traceback would bury it
        print(f"train_net: {e}", file=sys.stderr)
        sys.exit(2)


def cli(argv=None) -> int:
    args = parse_args(argv)
    try:  # fail here, once, with a short message, before any model is built and in no worker process
        register_coco_datasets(args.register_coco)
        cfg = load_config(args.config_file, args.opts)
        check_run_settings(
            cfg, eval_only=args.eval_only, resume=args.resume, world_size=args.num_gpus * args.num_machines
        )
        out = run_settings(cfg).output_dir
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"train_net: {e}", file=sys.stderr)
        return 2
    key = "train.output_dir" if args.config_file.endswith(".py") else "OUTPUT_DIR"
    # One run per output folder (on the first machine, which writes the checkpoints).
    lock = output_dir_lock(out, key) if args.machine_rank == 0 else contextlib.nullcontext()
    try:
        with lock:
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except OutputDirLockedError as e:
        print(f"train_net: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"train_net: interrupted. {resume_hint(out)}", file=sys.stderr)
        return 130
    except mp.ProcessExitedException as e:  # a worker exited with an error code (e.g. the NaN guard)
        print(f"train_net: a worker process failed: {e}", file=sys.stderr)
        return e.exit_code or 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
