#!/usr/bin/env python
"""Classify images with a published MViTv2 and print the top-k classes of each.

    python tools/classify.py                              # the bundled demo/*.jpg, MViTv2-T
    python tools/classify.py my.jpg other.png --model mvitv2-base_3rdparty_in1k --topk 3
    python tools/classify.py my.jpg --weights work_dirs/finetune/model_final.pth --device cuda
    python tools/classify.py photos/ --weights work_dirs/finetune/model_final.pth   # every image in photos/

Without ``--weights`` the published checkpoint is downloaded (and cached in the torch hub folder).
When that is impossible (no network), the tool says why, warns loudly that it continues with RANDOM
weights, and still runs end to end, so the pipeline can be tried offline; such predictions are meaningless.

Exit status: 0 on success (also in that offline fallback), 1 if any image could not be read,
2 for bad arguments or a ``--weights`` file that cannot be loaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
import torch

from mvit_det import get_model, inference_model, list_models
from mvit_det.checkpoint import describe_state_dict, load_checkpoint, open_source, read_checkpoint
from mvit_det.checkpoint.described import get_description
from mvit_det.checkpoint.loading import CheckpointMismatchError
from mvit_det.classification.cli_messages import mismatch_for_cli
from mvit_det.data import ImageReadError
from mvit_det.data.images import IMAGE_EXTENSIONS
from mvit_det.models import get_card

DEMO_DIR = REPO_ROOT / "demo"
DEFAULT_MODEL = "mvitv2-tiny_3rdparty_in1k"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", type=Path,
                        help=f"image files, or folders of images (default: {DEMO_DIR}/*.jpg)")
    parser.add_argument("--model", choices=list_models(), metavar="NAME",
                        help=f"one of: {', '.join(list_models())} (default: the one a self-describing --weights "
                             f"file names, else {DEFAULT_MODEL})")
    parser.add_argument("--weights", metavar="PATH_OR_URL",
                        help="checkpoint to load instead of the published one (any supported format); one written "
                             "by tools/cls_train.py also brings its classes, input size and preprocessing")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per image (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}.")
    if not args.images:
        args.images = sorted(DEMO_DIR.glob("*.jpg"))
        if not args.images:
            parser.error(f"no images given and no demo images found in {DEMO_DIR}; pass image paths.")
    else:
        args.images = expand_images(args.images, parser)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r} is not a device ({e}).")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but CUDA is not available here; use --device cpu.")
    return args


def expand_images(paths: list[Path], parser: argparse.ArgumentParser) -> list[Path]:
    """Files as given; a folder as its image files, sorted (not recursive, hidden files left out)."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)  # a missing file is reported, with the others classified, when it is read
            continue
        found = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not found:
            parser.error(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); pass image files or a "
                         "folder of them.")
        out += found
    return out


def _with_weights(name: str | None, weights: str) -> torch.nn.Module:
    """``--weights`` in ``name`` (or the model it describes). A checkpoint without class names but with a head of
    another size than the model's keeps its head: the classes are then printed by label number."""
    ckpt, label = open_source(weights)
    if get_description(ckpt) is not None:
        return get_model(name, pretrained=weights)
    name = name or DEFAULT_MODEL
    info = describe_state_dict(read_checkpoint(ckpt, label=label)[0])
    card = get_card(name)
    if info.num_classes is None or info.num_classes == card.num_classes or info.size != card.size:
        return get_model(name, pretrained=weights)  # a mismatch is then reported in terms of --model
    model = get_model(name, num_classes=info.num_classes)
    load_checkpoint(model, ckpt, strict=True, label=label)
    print(f"note: --weights {weights} has a {info.num_classes}-class head and no class names (only checkpoints "
          "written by tools/cls_train.py carry them); classes are shown as label numbers.", file=sys.stderr)
    return model.eval()


def load_classifier(name: str | None, weights: str | None) -> tuple[torch.nn.Module, bool]:
    """The model and whether its weights are real. Exits with status 2 if ``--weights`` fails."""
    if weights is not None:
        try:
            return _with_weights(name, weights), True
        except CheckpointMismatchError as e:  # the loader advises Python arguments; name the flag instead
            print(f"error: cannot load --weights {weights} into {name or DEFAULT_MODEL}: "
                  f"{mismatch_for_cli(e, model_flag='--model')}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # any loader failure is the user's file: report it, don't trace back
            print(f"error: cannot load --weights {weights} into {name or DEFAULT_MODEL}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            sys.exit(2)
    name = name or DEFAULT_MODEL
    try:
        return get_model(name, pretrained=True), True
    except Exception as e:  # typically no network; the loader's message says what it tried
        print(f"Could not load the published weights of {name}: {type(e).__name__}: {e}", file=sys.stderr)
    bar = "!" * 78
    print(
        f"{bar}\n"
        f"!! WARNING: continuing with RANDOM weights for {name}.\n"
        f"!! The predictions below are MEANINGLESS: this only shows that the pipeline runs.\n"
        f"!! For real predictions, allow the download or pass --weights PATH_OR_URL.\n"
        f"{bar}",
        flush=True,
    )
    return get_model(name, pretrained=False), False


def print_table(path: Path, result: dict, seconds: float, random_weights: bool) -> None:
    note = "  [RANDOM weights: meaningless]" if random_weights else ""
    print(f"\n{path}  ({seconds * 1000:.0f} ms){note}")
    print(f"{'rank':>4}  {'label':>5}  {'score':>6}  class")
    for rank, (label, score, name) in enumerate(result["topk"], start=1):
        print(f"{rank:>4}  {label:>5}  {score:6.4f}  {name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    model, real_weights = load_classifier(args.model, args.weights)
    model.to(args.device)

    failed = 0
    for path in args.images:
        start = time.perf_counter()
        try:
            result = inference_model(model, path, topk=args.topk)
        except ImageReadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print_table(path, result, time.perf_counter() - start, random_weights=not real_weights)
    if failed:
        print(f"\n{failed} of {len(args.images)} images could not be read.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
