"""detectron2's own tools work with the toy config, because importing the config registers the toy datasets.

The installed detectron2 package does not ship its ``tools/`` folder, so the test replays, in a fresh process, the
calls that ``tools/lazyconfig_train_net.py --config-file configs/toy/mvitv2_t_maskrcnn_toy.py train.device=cpu
train.max_iter=2`` and ``tools/analyze_model.py --config-file configs/toy/... --tasks flop --num-inputs 2`` make
(``LazyConfig.load`` + ``apply_overrides`` + ``default_setup``, ``instantiate(cfg.model)``, ``cfg.optimizer``,
``cfg.dataloader.train`` and ``cfg.lr_multiplier``, ``SimpleTrainer``/``AMPTrainer`` with the tool's hooks, the
final ``EvalHook`` evaluation through ``cfg.dataloader.test`` and ``cfg.dataloader.evaluator`` (COCOEvaluator), and
``detectron2.utils.analysis.FlopCountAnalysis`` on test-loader batches). Nothing in that process registers a
dataset or touches ``mvit_det`` except what loading the config does: before it, the toy names are unknown (the
``KeyError: Dataset 'mvit_toy_train' is not registered`` that a user saw); after it, they are registered with their
metadata but nothing is generated; the train loader generates the images under ``$MVIT_DET_DATASETS``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"

# lazyconfig_train_net.py (main, do_train, do_test) and analyze_model.py (setup, do_flop), condensed, in that order.
SCRIPT = r"""
import json, logging, os, sys
from collections import Counter

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import (AMPTrainer, SimpleTrainer, create_ddp_model, default_argument_parser,
                               default_setup, default_writers, hooks)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.analysis import FlopCountAnalysis

report = {"registered_before_load": sorted(n for n in DatasetCatalog.list() if n.startswith("mvit_toy")),
          "mvit_det_imported_before_load": any(m.startswith("mvit_det") for m in sys.modules)}
root = os.path.join(os.environ["MVIT_DET_DATASETS"], "mvit_toy")

# ---- tools/lazyconfig_train_net.py --config-file TOY train.device=cpu train.max_iter=2
args = default_argument_parser().parse_args(["--config-file", sys.argv[1], "train.device=cpu", "train.max_iter=2"])
cfg = LazyConfig.load(args.config_file)
cfg = LazyConfig.apply_overrides(cfg, args.opts)
report["registered_after_load"] = sorted(n for n in DatasetCatalog.list() if n.startswith("mvit_toy"))
report["generated_after_load"] = os.path.exists(root)
report["thing_classes"] = MetadataCatalog.get("mvit_toy_train").thing_classes
default_setup(cfg, args)

def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
        print_csv_format(ret)
        report["eval"] = ret
        return ret

model = instantiate(cfg.model)
model.to(cfg.train.device)
cfg.optimizer.params.model = model
optim = instantiate(cfg.optimizer)
train_loader = instantiate(cfg.dataloader.train)
report["generated_by_loader"] = os.path.isfile(os.path.join(root, "DONE"))
model = create_ddp_model(model, **cfg.train.ddp)
trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
report["trainer"] = type(trainer).__name__
checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
trainer.register_hooks([
    hooks.IterationTimer(),
    hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
    hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
    hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
    hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=1),
])
checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
trainer.train(0, cfg.train.max_iter)
report["iterations_run"] = trainer.iter  # detectron2 leaves iter at max_iter after the loop
report["output_dir"] = os.path.abspath(cfg.train.output_dir)

# ---- tools/analyze_model.py --config-file TOY --tasks flop --num-inputs 2
cfg = LazyConfig.apply_overrides(LazyConfig.load(sys.argv[1]), ["train.device=cpu"])
data_loader = instantiate(cfg.dataloader.test)
model = instantiate(cfg.model)
model.to(cfg.train.device)
DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
model.eval()
counts, totals = Counter(), []
for idx, data in zip(range(2), data_loader):
    flops = FlopCountAnalysis(model, data)
    if idx > 0:
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    counts += flops.by_operator()
    totals.append(flops.total())
report["flops"] = totals
report["flops_by_operator"] = {k: float(v) for k, v in counts.items()}
report["input_hw"] = [list(d["image"].shape[1:]) for d in data]
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_lazyconfig_train_net_and_analyze_model_flow(tmp_path):
    datasets = tmp_path / "datasets"
    env = dict(os.environ, PYTHONPATH=str(REPO), MVIT_DET_DATASETS=str(datasets), PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(TOY)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert lines, out[-4000:]
    r = json.loads(lines[-1][len("REPORT "):])

    # Loading the config is what registers the toy sets; registration generates nothing; the loader does.
    assert r["registered_before_load"] == [] and r["mvit_det_imported_before_load"] is False
    assert r["registered_after_load"] == ["mvit_toy_train", "mvit_toy_val"]
    assert r["generated_after_load"] is False and r["generated_by_loader"] is True
    assert r["thing_classes"] == ["circle", "square", "triangle"]
    assert sorted(p.name for p in datasets.iterdir()) == ["mvit_toy"]  # no temporary folder left beside it

    # Two training iterations with detectron2's own trainer, logged with finite losses, then the final evaluation.
    assert r["trainer"] == "SimpleTrainer" and r["iterations_run"] == 2
    out_dir = Path(r["output_dir"])
    assert out_dir.is_relative_to(tmp_path)  # the config's relative output_dir, under the tool's working directory
    records = [json.loads(ln) for ln in (out_dir / "metrics.json").read_text().splitlines()]
    train = [rec for rec in records if "total_loss" in rec]
    assert [rec["iteration"] for rec in train] == [0, 1]
    assert all(math.isfinite(rec["total_loss"]) and rec["total_loss"] > 0 for rec in train)
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(train[0])
    assert set(r["eval"]) == {"bbox", "segm"}
    assert all(math.isfinite(r["eval"][task]["AP"]) for task in ("bbox", "segm"))
    assert (out_dir / "model_final.pth").is_file()

    # fvcore FLOP counting through detectron2's FlopCountAnalysis on two test-loader batches of 1 image.
    assert len(r["flops"]) == 2 and all(f > 1e9 for f in r["flops"]), r["flops"]
    ops = r["flops_by_operator"]
    assert ops.get("conv", 0) > 1e9 and ops.get("linear", 0) > 1e9, ops  # FPN/heads convs; trunk and box-head FCs
    assert sum(ops.values()) == pytest.approx(sum(r["flops"]), rel=1e-6)
