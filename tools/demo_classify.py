#!/usr/bin/env python
"""The classification main job (``make demo-classify``), offline on a CPU: train MViTv2-T on a real labelled image set,
report the held-out top-1, draw predictions and the confusion matrix, then classify a few held-out images with the
trained checkpoint through tools/classify.py.

    python tools/demo_classify.py                       # what `make demo-classify` runs
    python tools/demo_classify.py --epochs 3 --output output/demo_classify_quick

Steps:
1. write scikit-learn's handwritten digits (1797 8x8 images shipped inside the scikit-learn package; nothing is
   downloaded) as an ImageFolder of 32x32 PNGs, 80% of each digit for training and 20% held out;
2. train MViTv2-T from random weights with tools/cls_train.py (recipe configs/classification/digits_tiny.yaml);
   it writes model_final.pth, metrics.json, TensorBoard events and confusion_matrix.png;
3. draw 24 held-out images with their predicted and true digit (predictions.png);
4. run tools/classify.py on three held-out images with --weights OUTPUT/train/model_final.pth only: the class
   names, input size and preprocessing come from the checkpoint;
5. print the held-out top-1 and the time, and write summary.json. Exit code 1 if the top-1 is below --min-top1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mvit_det.utils.atomic import atomic_open

REPO = Path(__file__).resolve().parents[1]

CONFIG = REPO / "configs" / "classification" / "digits_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="output/demo_classify", help="output folder (default %(default)s)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (default %(default)s)")
    p.add_argument("--min-top1", type=float, default=80.0, help="fail below this held-out top-1 (default %(default)s)")
    return p.parse_args(argv)


def draw_predictions(model, samples: list[tuple[str, int]], path: Path) -> float:
    """A grid of held-out images titled 'pred (true)', wrong ones in red; returns the grid's accuracy (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mvit_det import inference_model

    cols = 8
    rows = (len(samples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5))
    right = 0
    for ax, (img_path, label) in zip(axes.flat, samples):
        result = inference_model(model, img_path)
        pred = result["pred_label"]
        right += pred == label
        with Image.open(img_path) as im:
            ax.imshow(im.convert("L"), cmap="gray")
        ax.set_title(f"{pred} ({label})", color="black" if pred == label else "red", fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("held-out digits: predicted (true)", fontsize=11)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return 100.0 * right / len(samples)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output)
    from mvit_det.data.digits import write_digits

    data = write_digits(out / "data", size=32, val_fraction=0.2)
    print(f"[1/5] digits: {data['train']} training and {data['val']} held-out images (32x32) in {out / 'data'}",
          flush=True)

    train_out = out / "train"
    cmd = [sys.executable, str(REPO / "tools" / "cls_train.py"), "--data", data["train_dir"], "--val-data",
           data["val_dir"], "--model", "mvitv2-tiny_3rdparty_in1k", "--pretrained", "none", "--config", str(CONFIG),
           "--output", str(train_out), "--workers", str(args.workers)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if train_out.exists():  # this demo's own earlier run (seeded: a rerun trains it again, to the same weights)
        print(f"[2/5] removing the previous demo run in {train_out}", flush=True)
        shutil.rmtree(train_out)
    print("[2/5] training:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    train_seconds = time.perf_counter() - t0
    records = json.loads((train_out / "metrics.json").read_text())
    top1, top5 = records[-1]["val_top1"], records[-1]["val_top5"]

    from mvit_det import get_model
    from mvit_det.classification.train_data import prepare_data

    final = train_out / "model_final.pth"
    model = get_model(pretrained=str(final))
    val = prepare_data(data["val_dir"]).train  # every held-out image, labelled by folder
    step = max(1, len(val) // 24)
    grid = draw_predictions(model, val[::step][:24], out / "predictions.png")
    print(f"[3/5] {out / 'predictions.png'}: 24 held-out digits, {grid:.0f}% right; confusion matrix: "
          f"{train_out / 'confusion_matrix.png'}", flush=True)

    picks = [val[0][0], val[len(val) // 2][0], val[-1][0]]
    print(f"[4/5] tools/classify.py {' '.join(Path(p).name for p in picks)} --weights {final}", flush=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "classify.py"), *picks, "--weights", str(final),
                    "--topk", "3"], check=True)

    seconds = time.perf_counter() - start
    summary = {"val_top1": top1, "val_top5": top5, "val_images": data["val"], "train_images": data["train"],
               "epochs": len(records), "train_seconds": train_seconds, "total_seconds": seconds,
               "model_final": str(final), "predictions_png": str(out / "predictions.png"),
               "confusion_matrix_png": str(train_out / "confusion_matrix.png")}
    with atomic_open(out / "summary.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print(f"\n[5/5] MViTv2-T on held-out digits: top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({data['val']} images), "
          f"trained {len(records)} epochs in {train_seconds:.0f} s; total {seconds:.0f} s. Summary: {out / 'summary.json'}",
          flush=True)
    if top1 < args.min_top1:
        print(f"error: held-out top-1 {top1:.2f}% is below --min-top1 {args.min_top1}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
