#!/usr/bin/env python
"""Convert an MViTv2 checkpoint of any supported format into mvit-det's format.

    python tools/convert_checkpoint.py SRC DST [--model NAME]

SRC is a file (official ``.pyth``, mmpretrain ``.pth``, timm ``.pth``/``.safetensors``, detectron2
``.pth``/``.pkl``, mvit-det) or an http(s) URL. DST is written atomically as
``{"model": state_dict, "meta": {...}}``, which ``get_model(name, pretrained=DST)`` and
``load_checkpoint`` read directly. Detectron2 detector checkpoints give only the MViTv2 trunk.

With ``--model`` (a registry name from ``list_models()`` or a size such as ``T``/``small``; ``--arch`` is its old,
deprecated spelling), the converted weights are first loaded strictly into that model, so a wrong size fails
before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from mvit_det.checkpoint import describe_state_dict, load_checkpoint, read_checkpoint, save_checkpoint
from mvit_det.hub import model_for_checkpoint
from mvit_det.utils.cli import add_deprecated_alias


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint file or http(s) URL, in any supported format")
    parser.add_argument("dst", help="output file (mvit-det format)")
    parser.add_argument("--model", help="check that the weights load strictly into this model (registry name or size)")
    add_deprecated_alias(parser, "--arch", "--model")
    args = parser.parse_args(argv)

    state_dict, fmt = read_checkpoint(args.src)
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

    meta = {
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, RuntimeError) as e:  # bad file, wrong size, download failure: message only
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
