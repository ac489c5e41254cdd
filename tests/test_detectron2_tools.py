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
metadata but nothing is generated; the train loader generates the images under ``$MVIT_DET_DATASETS``. The same
process also replays ``analyze_model.py --tasks activation parameter structure``.

A second process replays ``tools/benchmark.py`` (``--task eval`` and ``--task data`` with the ``.py`` toy config,
``--task train``) and ``tools/train_net.py`` with the yacs toy config; the README's table "detectron2's tools and
mvit-det's" is what these two tests find.
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
TOY_YAML = REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml"

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
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators, parameter_count_table

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

# ---- tools/analyze_model.py --config-file TOY --tasks activation parameter structure --num-inputs 2
acts = [sum(activation_count_operators(model, d).values()) for _, d in zip(range(2), data_loader)]
report["mactivations"] = acts
report["parameter_table"] = parameter_count_table(instantiate(cfg.model), max_depth=5)
report["structure"] = str(instantiate(cfg.model))
print("REPORT " + json.dumps(report))
"""

# detectron2's tools/benchmark.py (setup, benchmark_eval, create_data_benchmark + benchmark_data, benchmark_train)
# and tools/train_net.py (setup, Trainer), condensed, with fewer iterations than the tool's 300/250/400.
BENCH_TRAIN_SCRIPT = r"""
import itertools, json, os, sys
import torch
from fvcore.common.timer import Timer
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetFromList, MetadataCatalog, build_detection_train_loader
from detectron2.data.benchmark import DataLoaderBenchmark
from detectron2.engine import DefaultTrainer, SimpleTrainer, default_argument_parser, default_setup, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import CommonMetricPrinter

toy_py, toy_yaml, out = sys.argv[1:4]
report = {}

def shipped_yacs_setup():
    # what benchmark.py's and train_net.py's setup() do with a .yaml file
    try:
        get_cfg().merge_from_file(toy_yaml)
    except Exception as e:
        return f"{type(e).__name__}: {e}"

def project_yacs_cfg(*opts):
    # the same, plus the one call a detectron2 project adds to its own train_net.py
    from mvit_det.detection import add_mvitv2_config
    cfg = get_cfg()
    add_mvitv2_config(cfg)
    cfg.merge_from_file(toy_yaml)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", *opts])
    return cfg

# ---- tools/benchmark.py --config-file TOY.py --task eval train.device=cpu
cfg = LazyConfig.apply_overrides(LazyConfig.load(toy_py), ["train.device=cpu"])
model = instantiate(cfg.model)
model.to(cfg.train.device)
DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
cfg.dataloader.num_workers = 0
data_loader = instantiate(cfg.dataloader.test)
model.eval()
dummy_data = DatasetFromList(list(itertools.islice(data_loader, 2)), copy=False)
with torch.no_grad():
    for k in range(1):  # warmup
        model(dummy_data[k])
    timer = Timer()
    for idx, d in enumerate(itertools.cycle(dummy_data)):
        if idx == 2:
            break
        report.setdefault("eval_outputs", []).append(len(model(d)[0]["instances"]))
report["eval_seconds"] = timer.seconds()

# ---- tools/benchmark.py --config-file TOY.py --task data
dl_cfg = LazyConfig.load(toy_py).dataloader.train
dl_cfg._target_ = DataLoaderBenchmark
benchmark = instantiate(dl_cfg)
report["data_benchmark"] = type(benchmark).__name__
try:
    benchmark.benchmark_distributed(4, 1)
except TypeError as e:  # its log line calls np.percentile(interpolation=...), which numpy 2.4 removed
    report["data_benchmark_error"] = str(e)

# ---- tools/benchmark.py --task train: LazyConfig files reach build_model(cfg), which reads yacs keys
try:
    build_model(LazyConfig.load(toy_py))
except Exception as e:
    report["train_py_error"] = f"{type(e).__name__}: {e}"
report["train_yaml_error"] = shipped_yacs_setup()
# benchmark_train's body on the yacs config read with add_mvitv2_config
cfg = project_yacs_cfg("OUTPUT_DIR", os.path.join(out, "benchmark_train"))
cfg.SOLVER.BASE_LR = 0.001
model = build_model(cfg)
optimizer = build_optimizer(cfg, model)
DetectionCheckpointer(model, optimizer=optimizer).load(cfg.MODEL.WEIGHTS)
dummy_data = list(itertools.islice(build_detection_train_loader(cfg), 3))
def f():
    data = DatasetFromList(dummy_data, copy=False, serialize=False)
    while True:
        yield from data
max_iter = 3
trainer = SimpleTrainer(model, f(), optimizer)
trainer.register_hooks([
    hooks.IterationTimer(),
    hooks.PeriodicWriter([CommonMetricPrinter(max_iter)]),
    hooks.TorchProfiler(lambda trainer: trainer.iter == max_iter - 1, cfg.OUTPUT_DIR, save_tensorboard=True),
])
trainer.train(1, max_iter)
report["benchmark_train_iter"] = trainer.iter
report["benchmark_train_profiles"] = sorted(os.listdir(cfg.OUTPUT_DIR))

# ---- tools/train_net.py --config-file TOY.yaml SOLVER.MAX_ITER 2 DATASETS.TEST "()" (a project's copy: +
# add_mvitv2_config; no final evaluation, which the LazyConfig replay covers, to keep the test short)
class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        assert MetadataCatalog.get(dataset_name).evaluator_type == "coco"
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

cfg = project_yacs_cfg("SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", os.path.join(out, "train_net"))
cfg.freeze()
default_setup(cfg, default_argument_parser().parse_args(["--config-file", toy_yaml]))
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
report["train_net_optimizer"] = type(trainer.optimizer).__name__
report["train_net_output_dir"] = cfg.OUTPUT_DIR
print("REPORT " + json.dumps(report))
"""


def replay(script: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run a replay script in a fresh process with its own dataset folder; its last REPORT line and its output."""
    datasets = str(tmp_path / "datasets")
    env = dict(os.environ, PYTHONPATH=str(REPO), MVIT_DET_DATASETS=datasets, PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert lines, out[-4000:]
    return json.loads(lines[-1][len("REPORT "):]), out


@pytest.mark.slow
def test_lazyconfig_train_net_and_analyze_model_flow(tmp_path):
    datasets = tmp_path / "datasets"
    r, _ = replay(SCRIPT, tmp_path, str(TOY))

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
    assert ops.get("matmul", 0) > 0 and "scaled_dot_product_attention" not in ops  # attention counted, not dropped

    # The other analyze_model tasks: activations per input, the parameter table, the structure.
    assert len(r["mactivations"]) == 2 and all(a > 1 for a in r["mactivations"]), r["mactivations"]
    assert "backbone.bottom_up" in r["parameter_table"] and "roi_heads.mask_head" in r["parameter_table"]
    assert r["structure"].startswith("GeneralizedRCNN(") and "MViTv2Backbone" in r["structure"]


def np_major_minor() -> tuple[int, int]:
    import numpy as np

    return tuple(int(x) for x in np.__version__.split(".")[:2])


@pytest.mark.slow
def test_benchmark_and_yacs_train_net_flow(tmp_path):
    """detectron2's tools/benchmark.py and tools/train_net.py with the toy configs. As shipped, ``--task eval`` and
    ``--task data`` read the ``.py`` config; ``--task train`` and train_net.py cannot read either kind (the ``.py``
    reaches ``build_model(cfg)``, which reads yacs keys; the ``.yaml`` meets a bare ``get_cfg()``). With the one call
    detectron2's projects add to their own copies, ``add_mvitv2_config(cfg)``, benchmark_train's loop and
    DefaultTrainer train the yacs toy config (mvit-det ships tools/train_net.py, which does this)."""
    r, out = replay(BENCH_TRAIN_SCRIPT, tmp_path, str(TOY), str(TOY_YAML), str(tmp_path / "out"))

    assert len(r["eval_outputs"]) == 2 and r["eval_seconds"] > 0
    # The loader runs its iterations (tqdm's "4/4"); only detectron2's timing summary can fail, for any config.
    assert r["data_benchmark"] == "DataLoaderBenchmark" and "4/4" in out
    if "data_benchmark_error" in r:
        assert "interpolation" in r["data_benchmark_error"] and np_major_minor() >= (2, 4), r["data_benchmark_error"]
    assert "MODEL" in r["train_py_error"], r["train_py_error"]
    assert "Non-existent config key: MODEL.MVIT" in r["train_yaml_error"], r["train_yaml_error"]
    assert r["benchmark_train_iter"] == 3 and r["benchmark_train_profiles"], r

    # train_net.py's Trainer: 2 iterations, a checkpoint, metrics
    out_dir = Path(r["train_net_output_dir"])
    assert (out_dir / "model_final.pth").is_file() and (out_dir / "config.yaml").is_file()
    records = [json.loads(ln) for ln in (out_dir / "metrics.json").read_text().splitlines()]
    train = [rec for rec in records if "total_loss" in rec]
    assert train and train[-1]["iteration"] == 1 and all(math.isfinite(rec["total_loss"]) for rec in train)
    assert r["train_net_optimizer"] == "SGD"  # detectron2's build_optimizer: the yacs AdamW recipe is mvit-det's
