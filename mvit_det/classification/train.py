"""Train or fine-tune an MViTv2 classifier on an image folder: what ``tools/cls_train.py`` runs.

    from mvit_det.classification.train import TrainConfig, train
    summary = train(TrainConfig(data="my_images", val_split=0.1, model="mvitv2-tiny_3rdparty_in1k",
                                pretrained="none", output="out", overrides={"epochs": 5, "batch_size": 32}))

Built on timm (transforms, RandAugment, Mixup/CutMix, random erasing, soft-target loss, optimiser and cosine
schedule factories, ``ModelEmaV3``) and PyTorch ``DistributedDataParallel``. Under ``torchrun`` (or
``spawn_cpu``) every process runs ``train``; the data order and augmentations depend only on the seed, the epoch
and the sample (``train_data``), so N processes give the result of one with the same global batch, and
``--resume`` continues exactly where the run stopped.

``OUT`` receives: ``model_final.pth`` (self-describing: architecture, class names, input size, preprocessing;
the EMA weights when the recipe keeps an EMA), ``model_best.pth`` (best validation top-1),
``checkpoint_epoch_NNNN.pth`` every ``ckpt_every`` epochs, ``last.pth`` (everything ``--resume`` needs),
``metrics.json``, ``tensorboard/`` and ``confusion_matrix.png``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..checkpoint import save_checkpoint
from ..checkpoint.io import load_file
from ..models import get_card
from ..utils.dist import is_distributed
from .datasets import EvalDataset, collate_skip_failed
from .described import describe_classifier
from .evaluate import AMP_DTYPES, autocast, evaluate
from .recipes import Recipe, resolve_recipe
from .train_data import (
    GlobalBatchSampler,
    TrainDataset,
    build_train_transform,
    eval_transform,
    prepare_data,
    sample_seed,
)
from .train_report import MetricsLog, confusion_matrix, plot_confusion_matrix
from .train_state import (
    OutputError,
    PretrainedError,
    ResumeError,
    TrainingDiverged,
    atomic_save,
    create_train_model,
    create_train_optimizer,
    build_scheduler,
    check_batch,
    check_output,
    check_previous_run,
    freeze_stages,
    interrupt_after,
    load_pretrained,
    probe_output,
    resume_difference,
    rng_state,
    set_rng_state,
)

__all__ = ["OutputError", "PretrainedError", "ResumeError", "TrainConfig", "TrainingDiverged", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run (picklable: spawned processes receive it whole). ``overrides`` holds recipe keys set on
    the command line (``epochs``, ``batch_size``, ``lr``, ``img_size``, ...), applied after ``config``."""

    data: str
    output: str = "output/cls_train"
    model: str = "mvitv2-tiny_3rdparty_in1k"
    pretrained: Optional[str] = None  # None: the model's published weights; "none": random initialisation
    labels: Optional[str] = None
    val_data: Optional[str] = None
    val_labels: Optional[str] = None
    val_split: Optional[float] = None
    recipe: Optional[str] = None
    config: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    amp: Optional[str] = None
    device: Optional[str] = None
    workers: int = 2
    seed: int = 0
    accum_steps: int = 1
    act_checkpoint: bool = False
    ckpt_every: int = 10
    eval_batch_size: int = 64
    stop_at_step: Optional[int] = None  # stop after this optimiser step, resumable (a planned interruption)
    progress: bool = True


def _setup_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, whether we created the group). torchrun's environment is enough to join."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _device(cfg: TrainConfig) -> torch.device:
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available here; use --device cpu.")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(name)
    if cfg.amp is not None and cfg.amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {cfg.amp!r}.")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError(
            "--amp fp16 needs CUDA: float16 training relies on a GradScaler and CUDA kernels. On the CPU use "
            "--amp bf16 (bfloat16 autocast), or leave --amp out for float32."
        )
    if cfg.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bfloat16; use --amp fp16.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _broadcast(obj: Any, rank: int, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _seed_step(seed: int, *where: int) -> None:
    """Reseed every generator from (seed, epoch, step, rank): drop path, Mixup and CutMix draws do not depend on
    what ran before, so a resumed run draws what the uninterrupted one drew."""
    s = sample_seed(seed, *where)
    torch.manual_seed(s)
    np.random.seed(s % (1 << 32))
    random.seed(s)


def _all_sum(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


class _Run:
    """The state of one run; ``train`` drives it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = _device(cfg)
        self.rank, self.world, self.own_group = _setup_distributed(self.device)
        self.out = Path(cfg.output)
        # Every argument is checked before the output folder is created, so a typo leaves nothing behind.
        self.recipe: Recipe = resolve_recipe(get_card(cfg.model).size, cfg.recipe, cfg.config, cfg.overrides)
        r = self.recipe
        check_batch(r, self.world, cfg.accum_steps)
        if self.rank == 0:
            check_previous_run(self.out, cfg.resume)
            probe_output(self.out)
        self.data = _broadcast(
            prepare_data(cfg.data, labels=cfg.labels, val_data=cfg.val_data, val_labels=cfg.val_labels,
                         val_split=cfg.val_split, seed=cfg.seed) if self.rank == 0 else None,
            self.rank, self.world,
        )  # fmt: skip
        self.names = self.data.class_names
        self.sampler = GlobalBatchSampler(len(self.data.train), r.batch_size, self.world, self.rank, cfg.accum_steps, cfg.seed)
        self.mixup = None
        if r.mixup > 0 or r.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=r.mixup_prob, switch_prob=r.mixup_switch_prob,
                mode="batch", label_smoothing=r.label_smoothing, num_classes=len(self.names),
            )
        self._build_model()
        if self.rank == 0:
            check_output(self.out)

    def _build_model(self) -> None:
        cfg, r = self.cfg, self.recipe
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.model, self.model_kwargs = create_train_model(cfg.model, len(self.names), r, cfg.act_checkpoint)
        # A resumed run takes every weight from last.pth: the initial weights would be replaced unread (and their
        # log line would contradict the "Resumed from" that follows).
        resuming = cfg.resume and (self.out / "last.pth").is_file()
        how = None if resuming else load_pretrained(self.model, cfg.model, cfg.pretrained)
        frozen = freeze_stages(self.model, r.freeze_stages)
        if self.rank == 0:
            if how is not None:
                logger.info("%s: %s", cfg.model, how)
            if frozen:
                logger.info("Frozen (stem and the first %d stage(s)): %d tensors", r.freeze_stages, len(frozen))
        self.model.to(self.device)
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.lr = r.learning_rate()
        self.optimizer = create_train_optimizer(self.model, r, self.lr)
        self.scheduler = build_scheduler(self.optimizer, r, self.sampler.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.ema = ModelEmaV3(self.model, decay=r.ema_decay, use_warmup=True) if r.ema else None
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif r.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(r.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, n, train seconds, unreadable images (this process, this epoch)
        self.best_top1, self.records = -1.0, []

    # -- checkpoints ---------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model, "classes": self.names, "train_images": len(self.data.train),
            "seed": self.cfg.seed, "recipe": self.recipe.to_dict(),
        }

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def description(self, **extra: Any) -> dict[str, Any]:
        r = self.recipe
        resize = eval_transform(r.img_size, r.crop_pct).resize_size
        return describe_classifier(
            self.cfg.model, self.model_kwargs, self.names, resize, r.img_size,
            recipe=r.to_dict(), ema=self.ema is not None, trained_by="tools/cls_train.py", **extra,
        )

    def save_weights(self, name: str, **extra: Any) -> Path:
        with interrupt_after():
            return save_checkpoint(self.eval_model().state_dict(), self.out / name, meta=self.description(**extra))

    def save_state(self) -> None:
        if self.rank != 0:
            return

        state = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
            "rng": rng_state(), "sums": self.sums, "best_top1": self.best_top1, "records": self.records,
            "fingerprint": self.fingerprint(),
        }
        meta = {"format": "mvit-det", "mvit_det_version": __version__, **self.description(epoch=self.epoch)}
        with interrupt_after():
            atomic_save({"model": self.model.state_dict(), "meta": meta, "train_state": state}, self.out / "last.pth")

    def resume(self) -> bool:
        path = self.out / "last.pth"
        if not path.is_file():
            if self.rank == 0:
                logger.info("--resume: no %s yet, starting from the beginning.", path)
            return False
        ckpt = load_file(path)
        state = ckpt.get("train_state")
        if state is None:
            raise ResumeError(f"{path} holds no training state; it cannot be resumed. Start a new --output.")
        diff, flags = resume_difference(state["fingerprint"], self.fingerprint())
        if diff:
            same = f" (e.g. {' '.join(flags)})" if flags else ""
            raise ResumeError(
                f"Cannot resume from {path}: that run had other settings: {'; '.join(diff)}. Resume with the saved "
                f"settings{same}, or train into a new --output (or delete the old one) to start over."
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.sums, self.best_top1, self.records = list(state["sums"]), state["best_top1"], list(state["records"])
        self.scheduler.step_update(self.global_step)
        if self.rank == 0:
            logger.info("Resumed from %s: epoch %d, step %d of %d (global step %d).", path, self.epoch + 1,
                        self.step_in_epoch, self.sampler.steps_per_epoch, self.global_step)
        return True

    # -- one optimiser step ------------------------------------------------------------------------------
    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        last = self.out / "last.pth"
        kept = f"The last good checkpoint {last} was kept" if last.exists() else "No checkpoint had been saved yet"
        return TrainingDiverged(
            f"{what} is {value} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} (global step "
            f"{self.global_step + 1}): training diverged, and this update was not applied. {kept}. Lower the "
            "learning rate (--lr), keep gradient clipping on, or use --amp bf16 / float32 instead of fp16; then "
            "--resume continues from the last good checkpoint."
        )

    def train_step(self, batches: list) -> float:
        cfg, accum = self.cfg, self.cfg.accum_steps
        total, count = 0.0, 0
        for m, batch in enumerate(batches):
            _seed_step(cfg.seed, self.epoch, self.step_in_epoch, self.rank, m)
            x, y = batch.images.to(self.device, non_blocking=True), batch.labels.to(self.device, non_blocking=True)
            self.sums[3] += len(batch.failed)
            if self.mixup is not None and x.shape[0] % 2:
                x, y = x[:-1], y[:-1]  # an unreadable image left an odd batch: Mixup pairs images
            if not x.shape[0]:  # every image of this micro-batch was unreadable: a zero loss keeps DDP in step
                x = torch.zeros(1, 3, self.recipe.img_size, self.recipe.img_size, device=self.device)
                y = torch.zeros(1, dtype=torch.long, device=self.device)
                empty = True
            else:
                empty = False
            target = y
            if self.mixup is not None and not empty:
                x, target = self.mixup(x, y)
            elif self.mixup is not None:
                target = torch.nn.functional.one_hot(y, len(self.names)).float()
            sync = m == accum - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast(self.device, cfg.amp):
                    loss = self.criterion(self.ddp(x), target) * (0.0 if empty else 1.0)
                bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
                if self.world > 1:
                    dist.all_reduce(bad)
                if bad.item():
                    raise self._diverged("The loss", float(loss.detach()))
                self.scaler.scale(loss / accum).backward()
            if not empty:
                total += float(loss.detach()) * x.shape[0]
                count += x.shape[0]
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.recipe.clip_grad:
            dispatch_clip_grad(params, self.recipe.clip_grad)
        if not self.scaler.is_enabled():
            norm = torch.norm(torch.stack([p.grad.detach().float().norm() for p in params]))
            if not torch.isfinite(norm):
                raise self._diverged("The gradient norm", float(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.scheduler.step_update(self.global_step)
        self.sums[0] += total
        self.sums[1] += count
        return total / max(count, 1)

    # -- epochs --------------------------------------------------------------------------------------------
    def current_lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def run_epoch(self, train_ds: TrainDataset) -> bool:
        """Train the rest of the epoch; False when stopped by ``stop_at_step``."""
        cfg, spe = self.cfg, self.sampler.steps_per_epoch
        self.sampler.set_position(self.epoch, self.step_in_epoch)
        loader = DataLoader(train_ds, batch_sampler=self.sampler, num_workers=cfg.workers,
                            collate_fn=collate_skip_failed, pin_memory=self.device.type == "cuda")
        bar = tqdm(total=spe, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.recipe.epochs}",
                   unit="step", disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        self.ddp.train()
        it, start = iter(loader), time.perf_counter()
        try:
            while self.step_in_epoch < spe:
                if cfg.stop_at_step is not None and self.global_step >= cfg.stop_at_step:
                    self.sums[2] += time.perf_counter() - start
                    self.save_state()
                    return False
                loss = self.train_step([next(it) for _ in range(cfg.accum_steps)])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.current_lr():.2e}")
                if self.rank == 0:
                    self.metrics.step(self.global_step, loss, self.current_lr())
        finally:
            bar.close()
        self.sums[2] += time.perf_counter() - start
        return True

    def end_epoch(self, val_ds: Optional[EvalDataset]):
        loss_sum, n, _, skipped = _all_sum(self.sums[:2] + [0.0, self.sums[3]], self.world)
        seconds = self.sums[2]
        if self.world > 1:
            t = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = float(t.item())
        result = None
        if val_ds is not None:
            result = evaluate(self.eval_model(), val_ds, batch_size=self.cfg.eval_batch_size, workers=self.cfg.workers,
                              device=self.device, amp=self.cfg.amp, progress=False)
            self.ddp.train()
        record = {
            "epoch": self.epoch + 1, "step": self.global_step, "loss": loss_sum / max(n, 1), "lr": self.current_lr(),
            "val_top1": None if result is None else result.top1, "val_top5": None if result is None else result.top5,
            "images_per_s": n / seconds if seconds > 0 else None, "train_seconds": seconds,
            # found unreadable by the first scan (left out of every epoch) and those that failed to load this epoch
            "skipped": len(self.data.skipped) + int(skipped),
        }
        self.records.append(record)
        self.epoch, self.step_in_epoch, self.sums = self.epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
        if self.rank == 0:
            self.metrics.epoch(record)
            top1 = record["val_top1"]
            if top1 is not None and top1 > self.best_top1:
                self.best_top1 = top1
                self.save_weights("model_best.pth", epoch=self.epoch, val_top1=top1)
            if self.cfg.ckpt_every and self.epoch % self.cfg.ckpt_every == 0:
                self.save_weights(f"checkpoint_epoch_{self.epoch:04d}.pth", epoch=self.epoch, val_top1=top1)
            logger.info("epoch %d: loss %.4f, lr %.3g, val top-1 %s, top-5 %s, %.1f images/s", self.epoch,
                        record["loss"], record["lr"], _pct(top1), _pct(record["val_top5"]), record["images_per_s"] or 0)
        self.save_state()
        return record, result


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training described by ``cfg`` (in every process of a distributed run); return the summary.

    Raises ``DatasetError`` / ``RecipeError`` / ``OutputError`` / ``ResumeError`` / ``ValueError`` for bad
    input (before any training), ``TrainingDiverged`` when the loss becomes NaN/Inf.
    """
    run = _Run(cfg)
    try:
        return _train(run)
    finally:
        if run.own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(run: _Run) -> dict[str, Any]:
    cfg, r, data = run.cfg, run.recipe, run.data
    if cfg.resume:
        run.resume()
    train_ds = TrainDataset(data.train, build_train_transform(r), cfg.seed)
    val_ds = None
    if data.val:
        val_ds = EvalDataset(data.val_root, data.val, data.layout, classes=run.names,
                             transform=eval_transform(r.img_size, r.crop_pct))
    if run.rank == 0:
        run.metrics = MetricsLog(run.out, run.records)
        logger.info(
            "Training %s on %d images of %d classes (%d validation, %d unreadable skipped): %d epochs x %d steps, "
            "global batch %d on %d process(es), lr %.3g, recipe %s.", cfg.model, len(data.train), len(run.names),
            len(data.val), len(data.skipped), r.epochs, run.sampler.steps_per_epoch, r.batch_size, run.world,
            run.lr, r.name,
        )  # fmt: skip
    summary: dict[str, Any] = {"output": str(run.out), "classes": run.names, "train_images": len(data.train),
                               "val_images": len(data.val), "skipped_images": len(data.skipped), "stopped": False}
    result = None
    try:
        while run.epoch < r.epochs:
            if not run.run_epoch(train_ds):
                summary.update(stopped=True, global_step=run.global_step, epoch=run.epoch)
                return summary
            record, result = run.end_epoch(val_ds)
    finally:
        if run.rank == 0:
            run.metrics.close()
    final = run.records[-1] if run.records else {}
    summary.update(global_step=run.global_step, epoch=run.epoch, val_top1=final.get("val_top1"),
                   val_top5=final.get("val_top5"), records=run.records)
    if run.rank == 0:
        path = run.save_weights("model_final.pth", epoch=run.epoch, val_top1=final.get("val_top1"))
        summary["model_final"] = str(path)
        if result is not None:
            pred = result.predictions[:, 0].numpy()
            labels = np.array([label for _, label in data.val])
            ok = pred >= 0
            cm = confusion_matrix(labels[ok], pred[ok], len(run.names))
            plot_confusion_matrix(cm, run.names, run.out / "confusion_matrix.png",
                                  f"{cfg.model}, {result.evaluated} validation images, top-1 {_pct(result.top1)}%")
            summary["confusion_matrix"] = cm.tolist()
        print(f"final validation: top-1 {_pct(final.get('val_top1'))}  top-5 {_pct(final.get('val_top5'))}  "
              f"({len(data.val)} images)  -> {path}", flush=True)
    return summary
