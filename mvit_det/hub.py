"""Name or file -> model: the one place that joins the model cards and the checkpoint loaders.

Dependencies run one way: ``models`` (networks, cards) < ``checkpoint`` (formats, files, downloads) < ``hub`` <
the tasks (classification, detection) < the tools. Every tool resolves a classifier here:

* ``get_model(name, pretrained=...)``: a published name (``list_models()``), optionally with its published
  weights or any checkpoint file or URL; or, with no name, a self-describing checkpoint (``tools/cls_train.py``).
* ``build_classifier(model_spec, checkpoint)``: what ``tools/cls_eval.py`` accepts as MODEL: a published name, a
  model config file (``.yaml``/``.json``, see ``load_model_config``) or ``SELF_DESCRIBED``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .checkpoint import CheckpointInfo, describe_state_dict, load_checkpoint, open_source, read_converted
from .checkpoint.described import attach_description, get_description
from .models import ARCHS, MODEL_CARDS, MViTv2, get_card, list_models
from .utils.hints import did_you_mean

__all__ = [
    "SELF_DESCRIBED",
    "ModelSpecError",
    "build_classifier",
    "get_model",
    "load_model_config",
    "model_for_checkpoint",
    "model_num_classes",
]


class ModelSpecError(ValueError):
    """The MODEL argument is neither a known model name nor a valid model config file."""


def get_model(
    name: Optional[str] = None,
    pretrained: Union[bool, str, Path] = False,
    *,
    num_classes: Optional[int] = None,
    strict: bool = True,
    **overrides,
) -> MViTv2:
    """Build a named model, optionally with weights.

    Args:
        name: one of ``list_models()``. May be omitted when ``pretrained`` is a checkpoint that describes itself
            (written by ``tools/cls_train.py``).
        pretrained: ``True`` downloads the published checkpoint (cached in the torch hub folder);
            a path or URL loads that file, in any supported format (official, mmpretrain, timm,
            detectron2, mvit-det). A self-describing checkpoint also sets the architecture, the number of
            classes, ``model.class_names`` and ``model.data_config`` (the evaluation preprocessing).
        num_classes: the classifier size. When it differs from the checkpoint's head, the head is left freshly
            initialised and every other weight must load (fine-tuning); when it is the same, the head loads too.
        strict: refuse any missing, unexpected or mis-shaped key (default). Set False to allow a
            partial load; what was skipped is logged.
        overrides: passed to ``MViTv2`` (for example ``drop_path_rate``).

    Returns the model in eval mode.
    """
    if name is not None and not isinstance(name, str):  # a detectron2 config, a path object, ...
        raise TypeError(
            f"get_model takes a model name (a str from list_models()), not a {type(name).__name__}. Detectors are "
            "built from their config: mvit_det.detection.predictor.build_predictor(config, weights)."
        )
    if isinstance(pretrained, (str, Path)) and Path(pretrained).suffix.lower() in _CONFIG_SUFFIXES:
        raise ValueError(
            f"pretrained={str(pretrained)!r} is a config file, not a checkpoint. A model config goes to "
            "build_classifier(config, checkpoint) (tools/cls_eval.py MODEL CHECKPOINT); a detector config to "
            "mvit_det.detection.predictor.build_predictor."
        )
    description = source = label = None
    if pretrained and pretrained is not True:
        source, label = open_source(pretrained)
        description = get_description(source)
    if name is None and description is None:
        raise ValueError(
            "get_model needs a model name (see list_models()) unless pretrained is a self-describing checkpoint "
            f"written by tools/cls_train.py; {pretrained!r} does not describe its model."
            if pretrained
            else "get_model needs a model name; see list_models()."
        )
    card = get_card(name) if name is not None else None
    if description is not None:
        kwargs = dict(description["model_kwargs"])
        # model_kwargs are MViTv2's keyword arguments, whose "arch" is here a size name such as "tiny"
        size = kwargs.get("arch")
        if card is not None and card.size != size:
            raise ValueError(
                f"Checkpoint {pretrained} holds an MViTv2-{size} classifier, but the model {name!r} is "
                f"MViTv2-{card.size}. Omit the model name (the checkpoint describes its model) or give a "
                f"{size} model."
            )
        ckpt_classes = kwargs["num_classes"]
        kwargs.update(overrides)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = MViTv2(**kwargs)
    else:
        ckpt_classes = card.num_classes
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        model = card.build(**overrides)
    if pretrained:
        if source is not None and description is None:  # any file: the head size is the checkpoint's own
            source = read_converted(source, label=label)  # converted once, loaded below as it is
            ckpt_classes = describe_state_dict(source.state_dict).num_classes
        new_head = num_classes is not None and num_classes != ckpt_classes
        if pretrained is True:
            load_checkpoint(model, card.url, strict=strict, skip_head=new_head)
        else:
            load_checkpoint(model, source, strict=strict, skip_head=new_head, label=label)
        if description is not None:
            attach_description(model, description)
    return model.eval()


_CONFIG_SUFFIXES = (".yaml", ".yml", ".py", ".json")


_CONFIG_KEYS = {"arch": str, "num_classes": int, "expand_attn": bool, "cls_token": bool}


def load_model_config(path: Union[str, Path]) -> dict[str, Any]:
    """Read a model config file: YAML (``.yaml``/``.yml``) or JSON (``.json``) with the keys

    ``arch`` (required: ``tiny``/``small``/``base``/``large``/``huge``), ``num_classes`` (default 1000),
    ``expand_attn`` (default true; false for the L in1k checkpoint), ``cls_token`` (default false; true for
    the in21k checkpoints). Returns the keyword arguments of ``MViTv2``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            cfg = json.loads(text)
        else:
            cfg = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json/yaml errors are ValueErrors
        raise ModelSpecError(f"Cannot read model config {path}: {e}") from None
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ModelSpecError(f"Cannot parse model config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"Model config {path} must be a mapping with keys {sorted(_CONFIG_KEYS)}.")
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ModelSpecError(f"Model config {path}: unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}.")
    if "arch" not in cfg:
        raise ModelSpecError(f"Model config {path} needs 'arch', one of {sorted(ARCHS)}.")
    for key, typ in _CONFIG_KEYS.items():
        if key in cfg and (type(cfg[key]) is not typ):
            raise ModelSpecError(f"Model config {path}: {key!r} must be a {typ.__name__}, got {cfg[key]!r}.")
    if cfg["arch"] not in ARCHS:
        raise ModelSpecError(f"Model config {path}: unknown arch {cfg['arch']!r}; choose from {sorted(ARCHS)}.")
    if cfg.get("num_classes", 1000) < 1:
        raise ModelSpecError(f"Model config {path}: num_classes must be >= 1, got {cfg['num_classes']}.")
    return {"num_classes": 1000, **cfg}


def model_num_classes(model_spec: str) -> int:
    """Classes of the model ``build_classifier(model_spec, ...)`` builds, without building it."""
    if model_spec in list_models():
        return get_card(model_spec).num_classes
    return _config_or_error(model_spec)["num_classes"]


def _config_or_error(model_spec: str) -> dict[str, Any]:
    path = Path(model_spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ModelSpecError(f"Model config file {path} does not exist.")
        return load_model_config(path)
    raise ModelSpecError(
        f"Unknown model {model_spec!r}.{did_you_mean(model_spec, list_models())} Give a name from list_models() ({', '.join(list_models())}) "
        f"or a .yaml/.json model config file."
    )


#: ``model_spec`` of a checkpoint that names its own model (written by tools/cls_train.py).
SELF_DESCRIBED = "<described by the checkpoint>"


def build_classifier(model_spec: str, checkpoint: Union[str, Path]) -> MViTv2:
    """A model name from ``list_models()`` or a model config file (``load_model_config``), with the weights of
    ``checkpoint`` (a path or URL in any format ``mvit_det.checkpoint`` reads), loaded strictly.
    ``SELF_DESCRIBED``: the checkpoint names its model."""
    if model_spec == SELF_DESCRIBED:
        return get_model(pretrained=str(checkpoint))
    if model_spec in list_models():
        return get_model(model_spec, pretrained=str(checkpoint))
    model = MViTv2(**_config_or_error(model_spec))
    load_checkpoint(model, str(checkpoint), strict=True)
    return model.eval()


def model_for_checkpoint(name: str, info: CheckpointInfo) -> MViTv2:
    """The model ``name`` (a name from ``list_models()`` or a size such as ``"T"``) that a checkpoint described by
    ``info`` should fill: a detection trunk for a trunk checkpoint; for a bare size, the class token, widening mode
    and classes come from the checkpoint (``tools/convert_checkpoint.py --model``)."""
    if name in MODEL_CARDS:
        if info.detection or info.num_classes is None:
            card = MODEL_CARDS[name]
            return MViTv2(card.size, detection=True)
        return get_model(name)
    if info.detection or info.num_classes is None:
        return MViTv2(name, detection=True)
    return MViTv2(
        name,
        num_classes=info.num_classes,
        expand_attn=info.expand_attn if info.expand_attn is not None else True,
        cls_token=info.cls_token,
    )
