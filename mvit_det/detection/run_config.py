"""Config files of both kinds and the run settings read from them, with the checks made before a model is built.

``load_config`` reads a LazyConfig ``.py`` or a yacs ``.yaml`` (safely: no YAML tag runs code) and applies
command-line overrides with did-you-mean errors; ``RunSettings`` is the one view of what differs between the two
config systems (``run_settings``, ``_set``); ``check_run_settings`` refuses bad values before anything is built.
The predictor, the exporter and the trainer all load configs through here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import zipfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import yaml

from detectron2.config import CfgNode, LazyConfig, get_cfg

from ..data.coco import check_datasets_registered
from .config import add_mvitv2_config, check_lazy_overrides, unknown_yacs_key_message
from .resume import check_output_dir, last_checkpoint_name

__all__ = [
    "RunSettings",
    "apply_overrides",
    "check_run_settings",
    "is_lazy",
    "load_config",
    "merge_yaml_safely",
    "prepare_config",
    "run_settings",
    "yacs_opts_to_list",
]

logger = logging.getLogger("mvit_det.engine")
AnyConfig = Union[CfgNode, Any]  # CfgNode (yacs) or omegaconf.DictConfig (LazyConfig)


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
        return apply_overrides(LazyConfig.load(path), opts)
    if ext in (".yaml", ".yml"):
        cfg = get_cfg()
        add_mvitv2_config(cfg)
        with _yacs_key_errors(cfg, path):
            merge_yaml_safely(cfg, path)
        return apply_overrides(cfg, opts)
    raise ValueError(f"Unknown config type {path!r}: use a LazyConfig .py file or a yacs .yaml file.")


def apply_overrides(cfg: AnyConfig, opts: Sequence[str] = ()) -> AnyConfig:
    """Apply command-line style overrides to a loaded config (in place for yacs; returns the config), with the
    checks of :func:`load_config`: unknown keys get "did you mean", unreadable values the quoting to use."""
    opts = _check_opts(opts)
    if is_lazy(cfg):
        _check_lazy_opts(opts)
        check_lazy_overrides(cfg, opts)  # apply_overrides would add a mistyped key silently
        for override in opts:  # one at a time (as apply_overrides does), to name the one it cannot read
            try:
                cfg = LazyConfig.apply_overrides(cfg, [override])
            except Exception as e:  # hydra's OverrideParseException, omegaconf's ValidationError
                if not type(e).__module__.startswith(("hydra", "omegaconf")):
                    raise
                raise ValueError(_override_quoting_message(override, e)) from None
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()
    with _yacs_key_errors(cfg):
        cfg.merge_from_list(yacs_opts_to_list(opts))
    if frozen:
        cfg.freeze()
    return cfg


def _check_opts(opts: Sequence[str]) -> list[str]:
    if isinstance(opts, str) or not all(isinstance(o, str) for o in opts):
        raise TypeError(
            f"opts must be a list of strings, got {opts!r}: e.g. ['train.max_iter=100'] for a LazyConfig, "
            "['SOLVER.MAX_ITER', '100'] for yacs."
        )
    flags = [o for o in opts if o.startswith("--")]
    if flags:  # argparse's REMAINDER gave --opts the options typed after it
        raise ValueError(
            f"{' '.join(flags)} came after the config overrides (--opts), which take every later argument as an "
            "override: put the overrides last on the command line."
        )
    return list(opts)


def _check_lazy_opts(opts: Sequence[str]) -> None:
    bad = [o for o in opts if "=" not in o]
    if bad:
        raise ValueError(
            f"LazyConfig overrides must be key=value, got {bad}. Example: train.max_iter=100 "
            "dataloader.train.total_batch_size=2."
        )


@contextlib.contextmanager
def _yacs_key_errors(cfg: CfgNode, path: Optional[str] = None):
    """yacs' unknown-key errors (KeyError from files, AssertionError from lists) as "did you mean" ValueErrors."""
    try:
        yield
    except (KeyError, AssertionError) as e:
        m = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
        if m is None:
            raise
        key = m.group(1)
        if path is not None and "." not in key and key.islower():  # detectron2's top-level keys are upper case
            raise ValueError(
                f"{path} is not a detectron2 config: its top-level key {key!r} is lower case, where detectron2's are "
                "MODEL, SOLVER, INPUT, ... A classification recipe (such as configs/classification/*.yaml) goes to "
                "tools/cls_train.py --config; detector configs are under configs/yacs/ and configs/*.py."
            ) from None
        raise ValueError(unknown_yacs_key_message(cfg, key)) from None


def _override_quoting_message(override: str, error: Exception) -> str:
    """How to quote a LazyConfig override value that hydra's override grammar cannot read."""
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
    folder can be written and, when training without ``--resume``, holds no earlier run; with ``--resume``,
    ``last_checkpoint`` names a complete file; a local initial checkpoint exists. Raises ``ValueError`` /
    ``FileNotFoundError`` naming the setting and the fix.
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
    out_key = _key(cfg, "train.output_dir", "OUTPUT_DIR")
    check_output_dir(s.output_dir, out_key)
    previous = last_checkpoint_name(s.output_dir)
    if not eval_only and not resume and previous is not None:
        raise ValueError(
            f"{out_key} {s.output_dir} already holds a run (its last_checkpoint names {previous}); training again "
            f"there would replace its checkpoints. Continue it with --resume, or set {out_key} to a new folder (or "
            "delete the old one) to start over."
        )
    last = os.path.join(s.output_dir, "last_checkpoint")
    if resume and os.path.isfile(last):
        _check_last_checkpoint(last, previous or "")
    elif s.init_checkpoint and "://" not in s.init_checkpoint and not os.path.exists(s.init_checkpoint):
        raise FileNotFoundError(
            f"{k('train.init_checkpoint', 'MODEL.WEIGHTS')} is {s.init_checkpoint}, which does not exist (relative paths "
            f"are relative to {os.getcwd()}). Check the path."
        )


def _check_last_checkpoint(last: str, name: str) -> None:
    """``--resume`` reads ``last_checkpoint``: the file it names (``name``) must exist and be complete."""
    folder = os.path.dirname(last)
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
