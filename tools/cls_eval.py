#!/usr/bin/env python
"""ImageNet top-1 / top-5 of an MViTv2 classifier, with the protocol of the published table.

    python tools/cls_eval.py mvitv2-tiny_3rdparty_in1k CHECKPOINT --data imagenet/val --out results.json

Single process, ``torchrun --nproc-per-node N tools/cls_eval.py ...``, or ``--num-procs N`` (N local CPU
processes, no torchrun needed). See ``--help``; the work is done by ``mvit_det.classification.evaluate``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mvit_det.checkpoint.described import read_description
from mvit_det.checkpoint.loading import CheckpointMismatchError
from mvit_det.classification.cli_messages import mismatch_for_cli
from mvit_det.classification.described import described_eval_dataset
from mvit_det.utils.cli import non_negative_int, positive_int
from mvit_det.utils.dist import is_distributed
from mvit_det.classification.datasets import LAYOUTS, DatasetError, build_eval_dataset, limit_dataset
from mvit_det.classification.evaluate import AMP_DTYPES, EvalJob, run_job, spawn_job
from mvit_det.hub import SELF_DESCRIBED, ModelSpecError, model_num_classes

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DESCRIPTION = "Top-1 / top-5 accuracy of an MViTv2 classifier on an ImageNet-style validation folder."

EPILOG = f"""\
MODEL is a name from mvit_det.list_models() (e.g. mvitv2-tiny_3rdparty_in1k) or a model config file,
.yaml/.yml or .json, with the keys
  arch: tiny            # tiny | small | base | large | huge (required)
  num_classes: 1000     # default 1000
  expand_attn: true     # default true; false for the L in1k checkpoint
  cls_token: false      # default false; true for the in21k checkpoints
CHECKPOINT is a path or an http(s) URL (downloaded once into the torch hub cache) in any format
mvit_det reads: official .pyth, mmpretrain, timm, detectron2, mvit-det. It must fit MODEL exactly.
A checkpoint written by tools/cls_train.py describes itself: give it alone (cls_eval.py OUT/model_final.pth
--data VAL); its input size, preprocessing and class names are used (class folders are matched by name).

{LAYOUTS}

Preprocessing is the published test pipeline (mvit_det.classification.EvalTransform): short side 256
(Pillow bicubic), centre crop 224, RGB mean/std normalisation. Grey, CMYK, 16-bit and EXIF-rotated images
are converted. Unreadable images (corrupt, truncated, not an image) are skipped, counted and listed; the
accuracy is over the images evaluated.

Several processes: under torchrun (torch.distributed environment variables; gloo on CPU, nccl on CUDA) or
with --num-procs N (N CPU processes on this machine). The images are split without padding or
duplication, so the result equals a single-process run; rank 0 prints and writes the files.

exit status:
  0  evaluated (also when some unreadable images were skipped)
  1  any other failure: a checkpoint that does not fit the model, a failed download, an error during
     evaluation, NaN/Inf logits (a diverged checkpoint), no image readable at all
  2  usage or data error: bad arguments, unknown model or bad model config, missing checkpoint file,
     data folder in neither layout, bad label file (the message gives the line), label out of range
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cls_eval.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", metavar="MODEL",
                   help="model name or model config file (.yaml/.json), see below; or, alone, a checkpoint written "
                        "by tools/cls_train.py (it names its model, classes and preprocessing)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", help="checkpoint path or URL")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="validation folder (ImageFolder, or images + label file)")
    p.add_argument("--labels", metavar="FILE",
                   help="label file of '<image path> <label>' lines (default: looked for next to --data)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass and process (default 64)")
    p.add_argument("--workers", type=non_negative_int, default=4,
                   help="DataLoader worker processes per process (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES),
                   help="autocast precision (default: float32); bf16 is the fast CPU path")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="evaluate only N images, spread evenly over the data (quick check)")
    p.add_argument("--num-procs", type=positive_int, default=1, metavar="N",
                   help="spawn N local CPU processes (no torchrun needed)")
    p.add_argument("--out", metavar="FILE", help="write the result as JSON")
    p.add_argument("--predictions", metavar="FILE",
                   help="write per-image top-5 labels as CSV (path, label, top1..top5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class UsageError(ValueError):
    pass


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torchrun = _launched_distributed()
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    # Every rank scans the data and loads the weights; only rank 0 tells about it.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="[%(levelname)s] %(message)s")
    try:
        job, num_procs = _prepare(args, torchrun)
        if torchrun:
            summary = run_job(job)
        elif num_procs > 1:
            summary = spawn_job(job, num_procs)
        else:
            summary = run_job(job)
    except (UsageError, DatasetError, ModelSpecError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointMismatchError as e:
        print(f"error: {_mismatch_message(e, args)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as e:
        print(f"error: a worker process failed:\n{e}", file=sys.stderr)
        return EXIT_FAILURE
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:  # bad checkpoint, download, NaN logits...
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if is_distributed():
            dist.destroy_process_group()
    if summary["evaluated"] == 0:
        if rank == 0:
            print(f"error: none of the {summary['images']} images could be read (all skipped).", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _mismatch_message(error: CheckpointMismatchError, args: argparse.Namespace) -> str:
    """The loader's Python advice (get_model(num_classes=...), strict=False) in MODEL / model-config terms."""
    config = args.model if str(args.model).lower().endswith((".yaml", ".yml", ".json")) else None
    message = mismatch_for_cli(error, model_flag="MODEL", config=config, configs_accepted=True)
    if getattr(args, "described", False):
        message += (f"\n{args.checkpoint} describes its own model: give it alone (cls_eval.py {args.checkpoint} "
                    "--data DIR) to use that.")
    return message


def _prepare(args: argparse.Namespace, torchrun: bool) -> tuple[EvalJob, int]:
    """Check everything that can be checked before loading weights; return the job and process count."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but CUDA is not available here; use --device cpu.")
    if args.num_procs > 1 and torchrun:
        raise UsageError("--num-procs cannot be combined with torchrun: torchrun already started the processes.")
    if args.num_procs > 1 and device != "cpu":
        raise UsageError("--num-procs starts CPU processes; for several GPUs use torchrun --nproc-per-node N.")

    if torchrun:
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    if args.checkpoint is None:  # one argument: a checkpoint that names its model
        args.model, args.checkpoint = SELF_DESCRIBED, args.model
    checkpoint_file = _local_checkpoint(args.checkpoint, torchrun)
    description = read_description(checkpoint_file)
    args.described = description is not None and args.model != SELF_DESCRIBED
    if args.model == SELF_DESCRIBED and description is None:
        raise UsageError(
            f"{args.checkpoint} does not describe its model (only checkpoints written by tools/cls_train.py do): "
            "give the model too, as in cls_eval.py MODEL CHECKPOINT --data DIR."
        )
    if description is not None:  # its input size, preprocessing and class names
        dataset = described_eval_dataset(description, args.data, args.labels)
    else:
        dataset = build_eval_dataset(args.data, labels=args.labels, num_classes=model_num_classes(args.model))
    if args.limit:
        dataset = limit_dataset(dataset, args.limit)
    job = EvalJob(
        model=args.model,
        checkpoint=args.checkpoint,
        checkpoint_file=checkpoint_file,
        dataset=dataset,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        amp=args.amp,
        out=args.out,
        predictions=args.predictions,
        progress=not args.no_progress,
    )
    return job, args.num_procs


def _local_checkpoint(checkpoint: str, torchrun: bool) -> str:
    """The local file of CHECKPOINT; a URL is downloaded once (by rank 0 first under torchrun)."""
    from mvit_det.checkpoint.io import download, is_url

    if not is_url(checkpoint):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"Checkpoint {checkpoint} {what}; give a checkpoint file or URL.")
        return str(path)
    if torchrun and dist.get_rank() != 0:
        dist.barrier()  # wait for rank 0's download, then read it from the cache
        return str(download(checkpoint))
    path = download(checkpoint)
    if torchrun:
        dist.barrier()
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
