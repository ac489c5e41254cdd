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

Everything that differs between the two config systems goes through ``RunSettings`` and the ``build_*``
functions below, so the loop itself is written once.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.engine import SimpleTrainer, create_ddp_model, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..data.coco import check_datasets_registered
from .checkpoint import MViTv2Checkpointer
from .resume import TrainLoaderState, remove_unfinished_checkpoints

__all__ = [
    "AtomicCheckpointer",
    "NonFiniteLossError",
    "RunSettings",
    "Trainer",
    "build_evaluator",
    "build_lr_scheduler",
    "build_model",
    "build_optimizer",
    "build_test_loader",
    "build_train_loader",
    "check_num_classes",
    "check_output_dir",
    "check_run_settings",
    "output_dir_lock",
    "OutputDirLockedError",
    "convert_sync_batchnorm",
    "do_test",
    "do_train",
    "has_fast_coco_eval",
    "head_num_classes",
    "is_lazy",
    "load_config",
    "merge_yaml_safely",
    "prepare_config",
    "register_coco_datasets",
    "run_settings",
    "setup_run",
    "weights_digest",
    "yacs_opts_to_list",
]

logger = logging.getLogger("mvit_det.engine")
AnyConfig = Union[CfgNode, Any]  # CfgNode (yacs) or omegaconf.DictConfig (LazyConfig)

# -- config loading ---------------------------------------------------------------------------------------
def is_lazy(cfg: AnyConfig) -> bool:
    return not isinstance(cfg, CfgNode)


_YACS_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def yacs_opts_to_list(opts: Sequence[str]) -> list[str]:
    """Accept yacs overrides as ``KEY VALUE`` pairs, ``KEY=VALUE`` tokens, or a mix; return ``[K, V, K, V, ...]``."""
    out: list[str] = []
    it = iter(opts)
    for tok in it:
        key, eq, value = tok.partition("=")
        if eq and _YACS_KEY.match(key):
            out += [key, value]
            continue
        if not _YACS_KEY.match(tok):
            raise ValueError(
                f"Cannot parse yacs override {tok!r}: expected 'KEY VALUE' or 'KEY=VALUE' with an upper-case "
                "dotted key, e.g. SOLVER.MAX_ITER 100 or SOLVER.MAX_ITER=100."
            )
        try:
            out += [tok, next(it)]
        except StopIteration:
            raise ValueError(f"yacs override {tok!r} has no value; write {tok} VALUE or {tok}=VALUE.") from None
    return out


def load_config(path: str, opts: Sequence[str] = ()) -> AnyConfig:
    """Load a LazyConfig ``.py`` or a yacs ``.yaml`` file and apply command-line overrides.

    ``.py``: ``LazyConfig.load`` + ``LazyConfig.apply_overrides`` with ``key=value`` strings.
    ``.yaml``/``.yml``: ``get_cfg()`` + ``add_mvitv2_config`` + ``merge_from_file`` + ``merge_from_list``; overrides
    may be ``KEY VALUE`` pairs or ``KEY=VALUE`` tokens.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} does not exist. Configs live under configs/ in the repository.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        bad = [o for o in opts if "=" not in o]
        if bad:
            raise ValueError(
                f"LazyConfig overrides must be key=value, got {bad}. Example: train.max_iter=100 "
                "dataloader.train.total_batch_size=2."
            )
        from .config import check_lazy_overrides

        cfg = LazyConfig.load(path)
        check_lazy_overrides(cfg, opts)  # apply_overrides would add a mistyped key silently
        for override in opts:  # one at a time (as apply_overrides does), to name the one it cannot read
            try:
                cfg = LazyConfig.apply_overrides(cfg, [override])
            except Exception as e:  # hydra's OverrideParseException, omegaconf's ValidationError
                if not type(e).__module__.startswith(("hydra", "omegaconf")):
                    raise
                raise ValueError(_override_quoting_message(override, e)) from None
        return cfg
    if ext in (".yaml", ".yml"):
        from . import add_mvitv2_config  # also registers the MViTv2 backbones with BACKBONE_REGISTRY
        from .config import unknown_yacs_key_message

        cfg = get_cfg()
        add_mvitv2_config(cfg)
        try:
            merge_yaml_safely(cfg, path)
            cfg.merge_from_list(yacs_opts_to_list(opts))
        except (KeyError, AssertionError) as e:  # yacs: KeyError from files, AssertionError from lists
            m = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
            if m is None:
                raise
            raise ValueError(unknown_yacs_key_message(cfg, m.group(1))) from None
        return cfg
    raise ValueError(f"Unknown config type {path!r}: use a LazyConfig .py file or a yacs .yaml file.")


def _override_quoting_message(override: str, error: Exception) -> str:
    """How to quote a LazyConfig override value that hydra's override grammar cannot read."""
    import shlex

    key, _, value = override.partition("=")
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    # Hydra's quoted strings: \" is a quote; backslashes are literal except right before a quote or the end.
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return (
        f"Cannot read the override {override!r}: {first}. A value with spaces, parentheses, quotes, commas, brackets "
        "or non-ASCII letters must be quoted, and the quotes must reach the program: on a POSIX shell write "
        f'{shlex.quote(f"{key}=" + chr(34) + escaped + chr(34))}.'
    )


def merge_yaml_safely(cfg: CfgNode, path: str) -> None:
    """``cfg.merge_from_file(path)`` with ``yaml.safe_load`` for the file and every ``_BASE_`` it names.

    detectron2's ``merge_from_file`` falls back to ``yaml.unsafe_load`` by default, so a tag such as
    ``!!python/object/apply:os.system`` in a config would run. Here such a tag is an error that names the file and
    line, and nothing runs. (A LazyConfig ``.py`` is Python code by design: run only ``.py`` configs you trust.)
    """
    import yaml

    try:
        cfg.merge_from_file(path, allow_unsafe=False)  # fvcore passes allow_unsafe on to every _BASE_ file
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else path
        raise ValueError(
            f"Config {path}: {where} uses a YAML tag that would create a Python object ({e.problem}). mvit-det reads "
            "YAML configs as data only (yaml.safe_load), so the tag was refused and nothing was run. Replace it with "
            "a plain value (number, string, list, mapping); Python code belongs in a LazyConfig .py file."
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"Config {path} is not valid YAML: {e}") from None


def setup_run(cfg: AnyConfig, args) -> None:
    """detectron2's ``default_setup`` (output dir, loggers, config dump, seed) plus this package's logger."""
    from detectron2.engine import default_setup
    from detectron2.utils.logger import setup_logger

    default_setup(cfg, args)
    setup_logger(run_settings(cfg).output_dir, distributed_rank=comm.get_rank(), name="mvit_det", abbrev_name="mvit")


def register_coco_datasets(specs: Sequence[Sequence[str]]) -> None:
    """Register COCO-format datasets given as ``(name, json_file, image_root)``; already-registered names with the
    same json file are skipped. Used by ``tools/train_net.py --register-coco``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.coco import register_coco_instances  # checks the files when the dataset is loaded

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


@dataclass
class RunSettings:
    """The training-loop settings, read from either config system."""

    output_dir: str
    max_iter: int
    checkpoint_period: int
    max_to_keep: Optional[int]
    eval_period: int
    log_period: int
    amp: bool
    device: str
    init_checkpoint: str
    train_datasets: tuple[str, ...]
    test_datasets: tuple[str, ...]


def _names(x) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


def _int(value: Any, key: str) -> int:
    """``int(value)`` with an error that names the config key (``train.max_iter=abc``)."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{key} must be an integer, got {value!r}.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}. Example: {key}=100.") from None


def run_settings(cfg: AnyConfig) -> RunSettings:
    if is_lazy(cfg):
        t = cfg.train
        log_period = t.get("log_period", 20)
        return RunSettings(
            output_dir=t.output_dir,
            max_iter=_int(t.max_iter, "train.max_iter"),
            checkpoint_period=_int(t.checkpointer.period, "train.checkpointer.period"),
            max_to_keep=t.checkpointer.get("max_to_keep", None),
            eval_period=_int(t.eval_period, "train.eval_period"),
            log_period=_int(log_period, "train.log_period"),
            amp=bool(t.amp.enabled),
            device=str(t.device),
            init_checkpoint=str(t.init_checkpoint or ""),
            train_datasets=_names(cfg.dataloader.train.dataset.names),
            test_datasets=_names(cfg.dataloader.test.dataset.names),
        )
    max_iter = _int(cfg.SOLVER.MAX_ITER, "SOLVER.MAX_ITER")
    return RunSettings(
        output_dir=cfg.OUTPUT_DIR,
        max_iter=max_iter,
        checkpoint_period=_int(cfg.SOLVER.CHECKPOINT_PERIOD, "SOLVER.CHECKPOINT_PERIOD"),
        max_to_keep=None,
        eval_period=_int(cfg.TEST.EVAL_PERIOD, "TEST.EVAL_PERIOD"),
        # yacs has no key for it; detectron2's DefaultTrainer uses 20. Short runs log more often.
        log_period=max(1, min(20, max_iter // 10)),
        amp=bool(cfg.SOLVER.AMP.ENABLED),
        device=str(cfg.MODEL.DEVICE),
        init_checkpoint=str(cfg.MODEL.WEIGHTS or ""),
        train_datasets=tuple(cfg.DATASETS.TRAIN),
        test_datasets=tuple(cfg.DATASETS.TEST),
    )


def _key(cfg: AnyConfig, lazy_key: str, yacs_key: str) -> str:
    return lazy_key if is_lazy(cfg) else yacs_key


def check_run_settings(cfg: AnyConfig, *, eval_only: bool = False, resume: bool = False, world_size: int = 1) -> None:
    """Refuse run settings that would fail (or silently do nothing) only after the model is built.

    Checked: integer settings are integers; ``max_iter`` >= 1 for training; checkpoint and log periods >= 1 and
    the evaluation period >= 0; the total batch size >= 1 and divisible by the number of processes; the output
    folder can be written; with ``--resume``, ``last_checkpoint`` names a complete file; a local initial
    checkpoint exists. Raises ``ValueError`` / ``FileNotFoundError`` naming the setting and the fix.
    """
    s = run_settings(cfg)  # integer settings
    k = lambda lazy, yacs: _key(cfg, lazy, yacs)  # noqa: E731
    if not eval_only:
        if s.max_iter < 1:
            raise ValueError(
                f"{k('train.max_iter', 'SOLVER.MAX_ITER')} is {s.max_iter}: nothing would be trained. Give the number "
                "of iterations to train (>= 1), or use --eval-only to only evaluate."
            )
        for value, key in [
            (s.checkpoint_period, k("train.checkpointer.period", "SOLVER.CHECKPOINT_PERIOD")),
            (s.log_period, k("train.log_period", "SOLVER.MAX_ITER (log period max_iter // 10)")),
        ]:
            if value < 1:
                raise ValueError(f"{key} is {value}; it is a number of iterations and must be >= 1.")
        if s.eval_period < 0:
            key = k("train.eval_period", "TEST.EVAL_PERIOD")
            raise ValueError(f"{key} is {s.eval_period}; use a number of iterations >= 1, or 0 to evaluate only at the end.")
        if is_lazy(cfg):
            batch = _int(cfg.dataloader.train.get("total_batch_size", 1), "dataloader.train.total_batch_size")
        else:
            batch = _int(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
        key = k("dataloader.train.total_batch_size", "SOLVER.IMS_PER_BATCH")
        if batch < 1:
            raise ValueError(f"{key} is {batch}; it is the number of images per iteration over all processes (>= 1).")
        if batch % world_size:
            raise ValueError(
                f"{key} is {batch}, which the {world_size} processes cannot share equally; use a multiple of "
                f"{world_size}."
            )
    check_output_dir(s.output_dir, _key(cfg, "train.output_dir", "OUTPUT_DIR"))
    last = os.path.join(s.output_dir, "last_checkpoint")
    if resume and os.path.isfile(last):
        _check_last_checkpoint(last)
    elif s.init_checkpoint and "://" not in s.init_checkpoint and not os.path.exists(s.init_checkpoint):
        raise FileNotFoundError(
            f"{k('train.init_checkpoint', 'MODEL.WEIGHTS')} is {s.init_checkpoint}, which does not exist (relative paths "
            f"are relative to {os.getcwd()}). Check the path."
        )


def check_output_dir(output_dir: str, key: str = "the output folder") -> None:
    """Create ``output_dir`` if needed and prove that a file can be written in it; ``ValueError`` otherwise."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ValueError(
            f"Cannot write to the output folder {output_dir!r} ({key}): {e.strerror or e}. Set {key} to a folder "
            "you can write."
        ) from None


LOCK_NAME = ".mvit_det_run.lock"


class OutputDirLockedError(RuntimeError):
    """Another run is using the output folder."""


@contextlib.contextmanager
def output_dir_lock(output_dir: str, key: str = "the output folder"):
    """Hold ``<output_dir>/.mvit_det_run.lock`` (this process's pid and host) while the block runs.

    Two runs in one folder would overwrite each other's checkpoints, ``last_checkpoint`` and metrics, so a second
    run is refused with ``OutputDirLockedError``. A lock left by a process that no longer exists on this machine
    (a killed run) is stale: it is taken over, with a warning.
    """
    import socket

    from .resume import _alive

    check_output_dir(output_dir, key)
    path = os.path.join(output_dir, LOCK_NAME)
    host = socket.gethostname()
    mine = f"{os.getpid()} {host} {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    owner = f.read().split()
            except FileNotFoundError:
                continue  # released meanwhile
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            owner_host = owner[1] if len(owner) > 1 else "?"
            if pid is not None and owner_host == host and not _alive(pid):
                logger.warning("Removing the stale lock %s of process %d, which no longer runs.", path, pid)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            since = " ".join(owner[2:4]) if len(owner) > 3 else "an unknown time"
            raise OutputDirLockedError(
                f"The output folder {output_dir} is in use by another run (pid {pid} on {owner_host}, since {since}); "
                f"two runs in one folder overwrite each other's checkpoints. Give this run its own folder ({key}=...), "
                f"or wait for the other run to finish. If no such run exists any more, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise OutputDirLockedError(f"Could not take the lock {path}: it keeps reappearing. Is another run starting?")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            with open(path, encoding="utf-8") as f:
                if f.read() == mine:
                    os.unlink(path)


def _check_last_checkpoint(last: str) -> None:
    """``--resume`` reads ``last_checkpoint``: the file it names must exist and be complete."""
    import zipfile

    folder = os.path.dirname(last)
    with open(last, encoding="utf-8", errors="replace") as f:
        name = f.read().strip()
    path = os.path.join(folder, name)
    others = sorted(n for n in os.listdir(folder) if n.endswith(".pth") and n != name)
    fix = (
        f"Write the name of a complete checkpoint into {last}"
        + (f" (found: {', '.join(others[-3:])})" if others else "")
        + " or delete it to start from the initial weights."
    )
    if not name or not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {last} names {name!r}, which does not exist in {folder}. {fix}")
    with open(path, "rb") as f:
        head = f.read(2)
    problem = "it is empty" if not head else None
    if head == b"PK":  # torch.save's zip: a cut-off file lacks the central directory at its end
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as e:
            problem = f"it is truncated or corrupt: {e}"
    if problem:
        raise ValueError(f"--resume: {last} names {path}, but {problem}. {fix}")


def _set(cfg: AnyConfig, lazy_key: str, yacs_key: str, value) -> None:
    """Set one setting in whichever config system ``cfg`` uses (yacs configs may be frozen)."""
    if is_lazy(cfg):
        node, _, leaf = lazy_key.rpartition(".")
        target = cfg
        for part in node.split("."):
            target = target[part]
        target[leaf] = value
        return
    frozen = cfg.is_frozen()
    cfg.defrost()
    node, _, leaf = yacs_key.rpartition(".")
    target = cfg
    for part in node.split("."):
        target = target[part]
    target[leaf] = value
    if frozen:
        cfg.freeze()


def prepare_config(cfg: AnyConfig) -> AnyConfig:
    """Adapt a config to the machine it runs on, logging every change.

    * no CUDA: device ``cpu`` and AMP off (detectron2's AMP needs CUDA);
    * every dataset the config names must be registered (the built-in toy sets are, by ``import mvit_det.detection``);
    * LazyConfig on a CPU: DDP fp16 gradient compression off (gloo has no use for it).
    """
    s = run_settings(cfg)
    if not torch.cuda.is_available():
        if s.device != "cpu":
            logger.info("CUDA is not available: running on the CPU (device was %r).", s.device)
            _set(cfg, "train.device", "MODEL.DEVICE", "cpu")
        if s.amp:
            logger.info("CUDA is not available: AMP (mixed precision) is disabled; training runs in float32.")
            _set(cfg, "train.amp.enabled", "SOLVER.AMP.ENABLED", False)
        if is_lazy(cfg) and cfg.train.get("ddp", {}).get("fp16_compression", False):
            cfg.train.ddp.fp16_compression = False
    check_datasets_registered(s.train_datasets + s.test_datasets)
    if not s.init_checkpoint:
        logger.warning(
            "No initial weights (%s is empty): the whole detector, backbone included, starts from random "
            "initialisation. Expect much lower accuracy than with ImageNet or COCO weights.",
            "train.init_checkpoint" if is_lazy(cfg) else "MODEL.WEIGHTS",
        )
    return cfg


# -- model, optimizer, data --------------------------------------------------------------------------------
def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` with an equivalent ``nn.BatchNorm2d`` (same parameters and buffers).

    ``nn.SyncBatchNorm`` rejects CPU tensors in distributed training and gains nothing in one process, so it is
    swapped out unless training runs on several GPUs. detectron2's ``NaiveSyncBatchNorm`` already falls back to
    plain BN in a single process and works with gloo, so it is left alone.
    """
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def build_model(cfg: AnyConfig) -> nn.Module:
    """Build the detector on the config's device (no weights loaded); CPU when CUDA is missing.

    SyncBN becomes BN unless training runs on several GPUs.
    """
    if run_settings(cfg).device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: building the model on the CPU.")
        _set(cfg, "train.device", "MODEL.DEVICE", "cpu")
    if is_lazy(cfg):
        model = instantiate(cfg.model)
    else:
        from detectron2.modeling import build_model as build_yacs_model

        from . import add_mvitv2_config  # noqa: F401  (registers the backbones)

        model = build_yacs_model(cfg)  # already on cfg.MODEL.DEVICE
    device = run_settings(cfg).device
    if not (device.startswith("cuda") and comm.get_world_size() > 1):
        n = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        if n:
            logger.info("Replacing %d SyncBatchNorm layers with BatchNorm (not a multi-GPU run).", n)
            model = convert_sync_batchnorm(model)
    return model.to(device)


def build_optimizer(cfg: AnyConfig, model: nn.Module) -> torch.optim.Optimizer:
    """LazyConfig: ``instantiate(cfg.optimizer)``. yacs: ``mvit_det.detection.build_optimizer`` (``SOLVER.OPTIMIZER``
    SGD or AdamW, no weight decay on norms and rel-pos tables, ``SOLVER.CLIP_GRADIENTS``)."""
    if is_lazy(cfg):
        cfg.optimizer.params.model = model
        return instantiate(cfg.optimizer)
    from .config import build_optimizer as build_yacs_optimizer

    return build_yacs_optimizer(cfg, model)


def _yacs_mapper(cfg: CfgNode, is_train: bool):
    from detectron2.data import DatasetMapper

    from .config import build_augmentation

    return DatasetMapper(cfg, is_train=is_train, augmentations=build_augmentation(cfg, is_train))


def build_train_loader(cfg: AnyConfig):
    if is_lazy(cfg):
        return instantiate(cfg.dataloader.train)
    from detectron2.data import build_detection_train_loader

    return build_detection_train_loader(cfg, mapper=_yacs_mapper(cfg, is_train=True))


def build_lr_scheduler(cfg: AnyConfig, optimizer: torch.optim.Optimizer):
    """A ``ParamScheduler`` (LazyConfig ``lr_multiplier``) or a torch scheduler (yacs), for ``hooks.LRScheduler``."""
    if is_lazy(cfg):
        return instantiate(cfg.lr_multiplier)
    from detectron2.solver import build_lr_scheduler as build_yacs_scheduler

    return build_yacs_scheduler(cfg, optimizer)


def has_fast_coco_eval() -> bool:
    """detectron2's C++ COCO evaluation needs the compiled ``detectron2._C`` (absent in pure-Python installs)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def build_evaluator(cfg: AnyConfig, dataset_name: str, output_dir: Optional[str] = None):
    """A ``COCOEvaluator`` for ``dataset_name`` (LazyConfig: ``cfg.dataloader.evaluator`` with that name)."""
    from detectron2.data import MetadataCatalog

    fast = has_fast_coco_eval()
    if is_lazy(cfg) and "evaluator" in cfg.dataloader:
        ev = cfg.dataloader.evaluator
        ev.dataset_name = dataset_name
        target = ev._target_
        if isinstance(target, str):
            from detectron2.utils.registry import locate

            target = locate(target)
        if isinstance(target, type) and issubclass(target, COCOEvaluator):
            ev.use_fast_impl = fast
            ev.output_dir = output_dir
        return instantiate(ev)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type != "coco":
        raise NotImplementedError(
            f"Dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; this project evaluates COCO-style "
            "instance detection only. Register the data with register_coco_instances."
        )
    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=fast)


def build_test_loader(cfg: AnyConfig, dataset_name: str):
    if is_lazy(cfg):
        cfg.dataloader.test.dataset.names = dataset_name
        return instantiate(cfg.dataloader.test)
    from detectron2.data import build_detection_test_loader

    return build_detection_test_loader(cfg, dataset_name, mapper=_yacs_mapper(cfg, is_train=False))


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


def head_num_classes(model: nn.Module) -> dict[str, int]:
    """Classes predicted by every box predictor (each cascade stage) and class-specific mask head of ``model``."""
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers
    from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FastRCNNOutputLayers):
            out[name] = int(m.num_classes)
        elif isinstance(m, BaseMaskRCNNHead) and isinstance(getattr(m, "predictor", None), nn.Conv2d):
            if m.predictor.out_channels > 1:  # 1 means class-agnostic masks
                out[name] = int(m.predictor.out_channels)
    return out


def check_num_classes(model: nn.Module, dataset_name: str) -> None:
    """Fail early, with the fix, when the heads and the dataset disagree on the number of classes.

    Call it after the dataset was loaded (``thing_classes`` is filled in by the loader). Without the check a
    custom dataset trained with COCO's 80 classes trains silently, and evaluation fails with a KeyError.
    """
    from detectron2.data import MetadataCatalog

    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if not classes:
        return
    wrong = {name: n for name, n in head_num_classes(model).items() if n != len(classes)}
    if wrong:
        raise ValueError(
            f"Dataset {dataset_name!r} has {len(classes)} classes ({', '.join(map(str, classes[:8]))}"
            f"{', ...' if len(classes) > 8 else ''}) but these heads predict another number: {wrong}. Set "
            f"model.roi_heads.num_classes={len(classes)} in a LazyConfig (the mask head and every cascade box "
            f"predictor follow it) or MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} in a yacs config."
        )


# -- checkpointing -------------------------------------------------------------------------------------------
class AtomicCheckpointer(MViTv2Checkpointer):
    """``MViTv2Checkpointer`` whose files are always complete: write to ``<file>.tmp<pid>.<random>``, then
    ``os.replace`` (:mod:`mvit_det.utils.atomic`).

    Pass ``require_all=True`` when the loaded weights are used as they are (``--eval-only``).
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f), binary=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)


def _atomic_write(path: str, write, binary: bool) -> None:
    from ..utils.atomic import atomic_open

    with atomic_open(path, "wb" if binary else "w") as f:
        write(f)


# -- the training loop ---------------------------------------------------------------------------------------
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
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=build_lr_scheduler(cfg, optimizer)),
            hooks.PeriodicCheckpointer(checkpointer, s.checkpoint_period, max_to_keep=s.max_to_keep)
            if comm.is_main_process()
            else None,
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
    checkpointer.resume_or_load(s.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter:
        logger.info("Resuming from %s at iteration %d.", checkpointer.get_checkpoint_file(), start_iter)
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
