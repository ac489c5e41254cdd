#!/usr/bin/env python
"""Train or fine-tune an MViTv2 classifier on a folder of images.

    python tools/cls_train.py --data TRAIN_DIR [--val-data VAL_DIR | --val-split 0.1] \\
        --model mvitv2-tiny_3rdparty_in1k [--pretrained none|PATH|URL] [--img-size 224] \\
        [--epochs N] [--batch-size B] [--lr LR] [--output OUT] [--resume] [--amp bf16|fp16] [--num-procs N]

One process, ``torchrun --nproc-per-node N tools/cls_train.py ...`` (no other flag), or ``--num-procs N`` (N local
CPU processes). The work is done by ``mvit_det.classification.train``; see ``--help``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__:  # imported as tools.cls_train (the tests)
    from .openmp_policy import choose_before_torch, processes_from_argv
else:  # run as a script: tools/ is on sys.path
    from openmp_policy import choose_before_torch, processes_from_argv

# Before torch loads OpenMP: spinning threads help on an idle CPU and collapse on a shared one (tools/openmp_policy.py).
OMP_CHOICE = choose_before_torch(processes_from_argv(sys.argv[1:]))
import torch  # noqa: E402

from mvit_det.checkpoint import DownloadError
from mvit_det.classification.datasets import LAYOUTS, DatasetError
from mvit_det.classification.recipes import RECIPES, RecipeError
from mvit_det.classification.train import (
    OutputError,
    PretrainedError,
    ResumeError,
    TrainConfig,
    TrainingDiverged,
    train,
)
from mvit_det.classification.train_state import interrupted_hint
from mvit_det.models import list_models
from mvit_det.utils.malloc import keep_freed_memory

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = f"""\
{LAYOUTS}
Class names are the folder names (ImageFolder) or the label numbers (label file); they are stored in the
checkpoints, so tools/cls_eval.py OUT/model_final.pth --data VAL, tools/classify.py IMG --weights
OUT/model_final.pth and get_model(pretrained='OUT/model_final.pth') need no other flag.

Recipes (--recipe, or 'recipe:' in a --config YAML file of recipe keys): imagenet (the official MViTv2 ImageNet-1k
recipe: AdamW, lr 2.5e-4 per 256 images, 300 epochs with 70 of warm-up, ...) and finetune (layer-wise lr decay 0.75,
EMA, 30 epochs). --epochs/--batch-size/--lr/--img-size change the recipe last. Without --lr the learning rate
scales linearly with the global batch (--batch-size: all processes and accumulation steps together).

OUT must not hold an earlier run (last.pth, model_final.pth, metrics.json, ...) unless --resume continues it.

exit status: 0 trained (or stopped at --stop-at-step), 1 other failure, 2 bad arguments or data (also an OUT that
holds a run, without --resume), 3 the loss became NaN/Inf (the last good checkpoint is kept; --resume continues from
it), 130 interrupted (Ctrl-C; --resume continues from OUT/last.pth).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cls_train.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="training folder (ImageFolder, or images + label file)")
    p.add_argument("--labels", metavar="FILE", help="label file of the training folder (default: looked for)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", metavar="DIR", help="validation folder, same layout and class names")
    val.add_argument("--val-split", type=float, metavar="F", help="hold out this fraction of each class")
    p.add_argument("--val-labels", metavar="FILE", help="label file of the validation folder")
    p.add_argument("--model", default="mvitv2-tiny_3rdparty_in1k", choices=list_models(), metavar="NAME",
                   help=f"architecture and published weights: {', '.join(list_models())} (default %(default)s)")
    p.add_argument("--pretrained", metavar="none|PATH|URL",
                   help="initial weights: default the model's published weights; 'none' for random; or any "
                        "checkpoint the loaders read (in1k, in21k, a detector's trunk, a previous fine-tune)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="training recipe (default imagenet)")
    p.add_argument("--config", metavar="YAML", help="recipe file: recipe keys (and 'recipe: NAME') to change")
    p.add_argument("--img-size", type=int, metavar="PX", help="training and evaluation input size (recipe: 224)")
    p.add_argument("--epochs", type=int, help="epochs (recipe: 300 imagenet, 30 finetune)")
    p.add_argument("--batch-size", type=int, metavar="B", help="global batch over all processes (recipe: 256)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's base lr scaled to the batch)")
    p.add_argument("--output", default="output/cls_train", metavar="OUT", help="output folder (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pth when it exists (without it, an OUT that holds a run is refused)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast precision (fp16: CUDA only); default float32")
    p.add_argument("--num-procs", type=int, default=1, metavar="N", help="spawn N local CPU processes (gloo)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per process (default 2)")
    p.add_argument("--accum-steps", type=int, default=1, metavar="K", help="gradient accumulation steps")
    p.add_argument("--act-checkpoint", action="store_true", help="activation checkpointing (less memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=10, metavar="E", help="periodic checkpoint every E epochs")
    p.add_argument("--stop-at-step", type=int, metavar="S",
                   help="stop after optimiser step S, saving a resumable state (time-boxed or preemptible jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "img_size": args.img_size}
    overrides = {k: v for k, v in flags.items() if v is not None}
    return TrainConfig(
        data=args.data, output=args.output, model=args.model, pretrained=args.pretrained, labels=args.labels,
        val_data=args.val_data, val_labels=args.val_labels, val_split=args.val_split, recipe=args.recipe,
        config=args.config, overrides=overrides, resume=args.resume, amp=args.amp, device=args.device,
        workers=args.workers, seed=args.seed, accum_steps=args.accum_steps, act_checkpoint=args.act_checkpoint,
        ckpt_every=args.ckpt_every, stop_at_step=args.stop_at_step, progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_procs", "accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="[%(levelname)s] %(message)s")
    logging.getLogger("mvit_det.cls_train").info("OpenMP: %s", OMP_CHOICE)
    logging.getLogger("mvit_det.cls_train").info("%s", keep_freed_memory())
    if args.num_procs > 1 and torchrun:
        parser.error("--num-procs cannot be combined with torchrun: torchrun already started the processes.")
    if args.num_procs > 1 and (args.device == "cuda" or (args.device is None and torch.cuda.is_available())):
        parser.error("--num-procs starts CPU processes; for several GPUs use torchrun --nproc-per-node N.")
    cfg = config_from_args(args)
    try:
        if args.num_procs > 1:
            from mvit_det.utils.launch import spawn_cpu

            cfg.device = "cpu"
            spawn_cpu(train, (cfg,), args.num_procs)
        else:
            train(cfg)
    except (DatasetError, RecipeError, OutputError, ResumeError, PretrainedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DownloadError as e:
        print(f"error: {e}\nWith tools/cls_train.py: --pretrained /path/to/that/file.pth, or --pretrained none to start "
              "from random weights.", file=sys.stderr)
        return EXIT_FAILURE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        print(f"error: a training process failed: {lines[-1] if lines else e}", file=sys.stderr)
        diverged = any(line.startswith(TrainingDiverged.__qualname__) or ".TrainingDiverged" in line for line in lines)
        return EXIT_DIVERGED if diverged else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"interrupted. {interrupted_hint(Path(args.output))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
