"""Training and evaluation for both config systems: LazyConfig ``.py`` files and yacs ``.yaml`` files.

``tools/train_net.py`` is a thin command line around this module; ``tools/main_job.py`` calls it in-process.
The loop is detectron2's ``SimpleTrainer`` with these changes:

* AMP (``torch.autocast`` + ``GradScaler``) runs only when CUDA is available; on a CPU it is switched off with a
  log line instead of failing inside ``AMPTrainer``.
* A NaN/Inf guard checks the loss on every rank *before* the backward pass and stops all ranks together with
  ``NonFiniteLossError``: the bad step never updates the weights and no checkpoint is written after it, so the
  last periodic checkpoint stays the last good one.
* Checkpoints are written atomically (temporary file + ``os.replace``), so a job killed while saving never
  leaves a truncated ``model_*.pth`` or a ``last_checkpoint`` pointing at one.
* ``--resume`` also continues the training images where they stopped (``resume.TrainLoaderState``) and removes the
  temporary files of a killed save; weights load through ``MViTv2Checkpointer`` (every ImageNet format, strict
  backbone checks, ``require_all`` for evaluation).

Around the loop: the device falls back to the CPU (with AMP off) when CUDA is missing, ``nn.SyncBatchNorm``
becomes BN outside multi-GPU runs, the heads' ``num_classes`` are checked against the dataset before training,
and every rank logs a digest of its final weights so that replicas can be compared.

Everything that differs between the two config systems goes through ``run_config.RunSettings`` and the
``builders``, so the loop itself is written once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import SimpleTrainer, create_ddp_model, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.coco import register_coco_instances  # checks the files when the dataset is loaded
from .builders import (
    build_evaluator, build_lr_scheduler, build_model, build_optimizer, build_test_loader, build_train_loader,
    check_num_classes,
)
from .checkpoint import AtomicCheckpointer, MViTv2Checkpointer
from .resume import TrainLoaderState, periodic_checkpoints, remove_unfinished_checkpoints
from .run_config import AnyConfig, is_lazy, run_settings

__all__ = ["NonFiniteLossError", "Trainer", "do_test", "do_train", "register_coco_datasets", "setup_run", "weights_digest"]

logger = logging.getLogger("mvit_det.engine")


def setup_run(cfg: AnyConfig, args) -> None:
    """detectron2's ``default_setup`` (output dir, loggers, config dump, seed) plus this package's logger."""
    default_setup(cfg, args)
    setup_logger(run_settings(cfg).output_dir, distributed_rank=comm.get_rank(), name="mvit_det", abbrev_name="mvit")


def register_coco_datasets(specs: Sequence[Sequence[str]]) -> None:
    """Register COCO-format datasets given as ``(name, json_file, image_root)``; already-registered names with the
    same json file are skipped. Used by ``tools/train_net.py --register-coco``."""


    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--register-coco {name}: annotation file {json_file} does not exist.")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"--register-coco {name}: image directory {image_root} does not exist.")
        json_file = os.path.abspath(json_file)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file", None) == json_file:
                continue
            raise ValueError(f"Dataset {name!r} is already registered with another json file; pick another name.")
        register_coco_instances(name, {}, json_file, os.path.abspath(image_root))


def do_test(cfg: AnyConfig, model: nn.Module) -> "OrderedDict[str, dict]":
    """Evaluate ``model`` on every test dataset; return ``{dataset: {"bbox": {...}, "segm": {...}}}``."""
    s = run_settings(cfg)
    results: "OrderedDict[str, dict]" = OrderedDict()
    for name in s.test_datasets:
        loader = build_test_loader(cfg, name)
        check_num_classes(model, name)
        evaluator = build_evaluator(cfg, name, os.path.join(s.output_dir, "inference", name))
        res = inference_on_dataset(model, loader, evaluator)
        if comm.is_main_process():
            logger.info("Evaluation results for %s in csv format:", name)
            print_csv_format(res)
        results[name] = res
    return results


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; raised on every rank before the bad update."""


class Trainer(SimpleTrainer):
    """``SimpleTrainer`` with CUDA-only AMP and a cross-rank NaN/Inf loss guard.

    Args:
        model, data_loader, optimizer: as ``SimpleTrainer``.
        amp: autocast the forward pass to float16 and scale the loss (CUDA only).
    """

    def __init__(self, model: nn.Module, data_loader, optimizer: torch.optim.Optimizer, *, amp: bool = False):
        super().__init__(model, data_loader, optimizer)
        if amp and not torch.cuda.is_available():
            raise ValueError("AMP needs CUDA; disable it (train.amp.enabled=False / SOLVER.AMP.ENABLED False).")
        self.amp = amp
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp else None
        self.stopped_on_nonfinite = False

    def run_step(self) -> None:
        assert self.model.training, "[Trainer] model was changed to eval mode!"
        t0 = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - t0

        diverged = None
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        except FloatingPointError as e:
            # detectron2's RPN raises this itself when its boxes or scores are already NaN/Inf (it happens before
            # the loss is computed once the weights have blown up); stop the same way, on every rank.
            device = next(self.model.parameters()).device  # the all-reduce below needs it on the model's device
            loss_dict, losses, diverged = {}, torch.full((), float("nan"), device=device), str(e)
        self._check_finite(losses, loss_dict, diverged)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _check_finite(self, losses: torch.Tensor, loss_dict: dict, diverged: Optional[str] = None) -> None:
        ok = torch.isfinite(losses.detach()).to(torch.float32).reshape(1)
        if comm.get_world_size() > 1:
            # Every rank must stop at the same step, or the others hang in the next all-reduce.
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            self.stopped_on_nonfinite = True
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            if diverged:
                detail = f"detectron2 stopped earlier in the forward pass: {diverged}"
            else:
                detail = f"this rank's losses: {values}"
            raise NonFiniteLossError(
                f"Loss became NaN or Inf at iteration {self.iter} ({detail}). Training was "
                "stopped before this update, so the last saved checkpoint holds the last good weights. Lower the "
                "learning rate or lengthen the warm-up, check the data for empty or degenerate boxes, then resume "
                "with --resume."
            )

    def state_dict(self) -> dict:
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class _EvalHook(hooks.EvalHook):
    """``EvalHook`` that skips the final evaluation after a NaN/Inf stop (nothing was trained to evaluate)."""

    def after_train(self):
        if getattr(self.trainer, "stopped_on_nonfinite", False):
            del self._func
            return
        super().after_train()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of all parameters (names, shapes, float32 bytes) in name order; equal across in-sync replicas."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _log_replica_digests(model: nn.Module) -> None:
    """Log this rank's weight digest; with several ranks, also check that all of them agree."""
    digest = weights_digest(model)
    logger.info("Final weights sha256 on rank %d: %s", comm.get_rank(), digest)
    if comm.get_world_size() > 1:
        digests = comm.all_gather(digest)
        if len(set(digests)) == 1:
            logger.info("Weights are identical on all %d ranks.", len(digests))
        else:
            logger.error("Weights differ between ranks: %s", digests)


def do_train(cfg: AnyConfig, resume: bool = False, model: Optional[nn.Module] = None) -> "OrderedDict[str, dict]":
    """Train with periodic checkpoints, evaluation and metric writers; return the last evaluation results.

    With ``resume=True`` the job continues from ``<output_dir>/last_checkpoint`` (weights, optimizer, scheduler and
    iteration) when it exists; otherwise it starts from the config's initial weights.
    """
    s = run_settings(cfg)
    model = model if model is not None else build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    train_loader = build_train_loader(cfg)
    for name in s.train_datasets:
        check_num_classes(model, name)

    if is_lazy(cfg):
        ddp_kwargs = dict(cfg.train.get("ddp", {}))
    else:
        ddp_kwargs = {"broadcast_buffers": False}
    if not s.device.startswith("cuda"):
        ddp_kwargs["device_ids"] = None  # a CPU module must not be given device ids
    ddp_model = create_ddp_model(model, **ddp_kwargs)

    last_results: "OrderedDict[str, dict]" = OrderedDict()

    def evaluate() -> "OrderedDict[str, dict]":
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    trainer = Trainer(ddp_model, train_loader, optimizer, amp=s.amp)
    # The sampler's seed goes into every checkpoint, so that --resume can continue the same image order.
    data_state = TrainLoaderState(train_loader)
    checkpointables = {"train_data": data_state} if data_state.supported else {}
    checkpointer = AtomicCheckpointer(model, s.output_dir, trainer=trainer, **checkpointables)
    periodic = hooks.PeriodicCheckpointer(checkpointer, s.checkpoint_period, max_to_keep=s.max_to_keep)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=build_lr_scheduler(cfg, optimizer)),
            periodic if comm.is_main_process() else None,
            _EvalHook(s.eval_period, evaluate),
            hooks.PeriodicWriter(default_writers(s.output_dir, s.max_iter), period=s.log_period)
            if comm.is_main_process()
            else None,
        ]
    )

    if resume and comm.is_main_process():
        removed = remove_unfinished_checkpoints(s.output_dir)
        if removed:
            logger.warning(
                "Removed %d unfinished checkpoint file(s) left by a job killed while saving: %s",
                len(removed), ", ".join(removed),
            )  # fmt: skip
    # Loading (ImageNet formats, resume with the trainer's state) is MViTv2Checkpointer's; the saver only writes.
    loader = MViTv2Checkpointer(model, s.output_dir, trainer=trainer, **checkpointables)
    loader.resume_or_load(s.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and loader.has_checkpoint() else 0
    if start_iter:
        logger.info("Resuming from %s at iteration %d.", checkpointer.get_checkpoint_file(), start_iter)
        # detectron2 remembers only the checkpoints this process saved: without this, max_to_keep would never
        # delete those of the interrupted run.
        periodic.recent_checkpoints = periodic_checkpoints(s.output_dir, before=start_iter)
        skipped = data_state.skip_batches(start_iter)
        if skipped:
            logger.info("The training data continue after the %d images per process used so far.", skipped)
    if start_iter >= s.max_iter:
        logger.info("Nothing to train: the checkpoint is at iteration %d and max_iter is %d.", start_iter, s.max_iter)
    try:
        trainer.train(start_iter, s.max_iter)
    except NonFiniteLossError:
        last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
        logger.error(
            "Stopped on a non-finite loss. Last good checkpoint: %s.",
            last or "none yet (no checkpoint had been saved before the failure)",
        )
        raise
    _log_replica_digests(model)
    return last_results
