#!/usr/bin/env python
"""Convert an MViTv2 checkpoint of any supported format into mvit-det's format.

    python tools/convert_checkpoint.py SRC DST [--model NAME]

SRC is a file (official ``.pyth``, mmpretrain ``.pth``, timm ``.pth``/``.safetensors``, detectron2
``.pth``/``.pkl``, mvit-det) or an http(s) URL. DST is written atomically as
``{"model": state_dict, "meta": {...}}``, which ``get_model(name, pretrained=DST)`` and
``load_checkpoint`` read directly. Detectron2 detector checkpoints give only the MViTv2 trunk. A checkpoint written
by ``tools/cls_train.py`` keeps its description (model, class names, input size, preprocessing), so the converted
file still works alone with ``tools/classify.py --weights`` and ``tools/cls_eval.py``. DST must not be SRC: the
source is never overwritten.

With ``--model`` (a registry name from ``list_models()`` or a size such as ``T``/``small``; ``--arch`` is its old,
deprecated spelling), the converted weights are first loaded strictly into that model, so a wrong size fails
before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mvit_det.checkpoint import describe_state_dict, load_checkpoint, open_source, read_checkpoint, save_checkpoint
from mvit_det.checkpoint.described import get_description
from mvit_det.hub import model_for_checkpoint
from mvit_det.utils.cli import add_deprecated_alias


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint file or http(s) URL, in any supported format")
    parser.add_argument("dst", help="output file (mvit-det format)")
    parser.add_argument("--model", help="check that the weights load strictly into this model (registry name or size)")
    add_deprecated_alias(parser, "--arch", "--model")
    args = parser.parse_args(argv)
    if _same_file(args.src, args.dst):
        print(f"error: {args.dst} is the source file itself; converting onto it would replace the source (and what "
              "it describes). Write to a new file, e.g. "
              f"{Path(args.dst).with_name(Path(args.dst).stem + '_converted.pth')}.", file=sys.stderr)
        return 2

    source, label = open_source(args.src)
    state_dict, fmt = read_checkpoint(source, label=label)
    info = describe_state_dict(state_dict)
    kind = "detection trunk" if (info.detection or info.num_classes is None) else "classifier"
    widen = {True: "in attention (expand_attn=True)", False: "in the MLP (expand_attn=False)", None: "unknown"}
    print(f"source:      {args.src}")
    print(f"format:      {fmt}")
    print(f"tensors:     {len(state_dict)}")
    print(f"blocks:      {info.depth}")
    print(f"width:       {info.embed_dim}")
    print(f"size:        {info.size_label}")
    print(f"widens:      {widen[info.expand_attn]}")
    print(f"cls token:   {'yes' if info.cls_token else 'no'}")
    print(f"num_classes: {info.num_classes if info.num_classes is not None else 'none (no head)'}")
    print(f"kind:        {kind}")

    if args.model:
        model = model_for_checkpoint(args.model, info)
        report = load_checkpoint(model, state_dict, strict=True)
        print(f"check:       all {len(report.loaded)} weights load strictly into --model {args.model}")

    description = _description(source, info)
    if description:
        print(f"described:   {len(description['class_names'])} classes, input {description.get('input_size')} px "
              "(kept: model, class names, input size, preprocessing)")
    meta = {
        **description,
        "source": Path(args.src).name if "://" not in args.src else args.src,
        "source_format": fmt,
        "size": info.size,
        "expand_attn": info.expand_attn,
        "cls_token": info.cls_token,
        "num_classes": info.num_classes,
        "detection": info.detection,
    }
    out = save_checkpoint(state_dict, args.dst, meta=meta)
    print(f"wrote:       {out}")
    return 0


def _same_file(src: str, dst: str) -> bool:
    """Whether DST names SRC (also through a link or another spelling of the path)."""
    if "://" in src:
        return False
    try:
        return os.path.samefile(src, dst)
    except OSError:  # one of them does not exist: not the same file
        return False


def _description(source, info) -> dict:
    """The source's self-description (written by tools/cls_train.py) when it still fits the weights, else {}.
    The bookkeeping of training (``format``, version) is the new file's own."""
    description = get_description(source)
    if description is None:
        return {}
    kwargs = description.get("model_kwargs", {})
    if kwargs.get("num_classes") != info.num_classes or len(description.get("class_names") or []) != info.num_classes:
        print(f"note:        the source's description ({kwargs.get('num_classes')} classes) does not match its "
              f"{info.num_classes}-class head; it is left out", file=sys.stderr)
        return {}
    return {k: v for k, v in description.items() if k not in ("format", "mvit_det_version")}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, RuntimeError) as e:  # bad file, wrong size, download failure: message only
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
