"""Training recipes for ``tools/cls_train.py``: the published ImageNet-1k recipe per size, and a fine-tuning recipe.

``imagenet`` is the official MViTv2 ImageNet-1k recipe (facebookresearch/mvit, ``configs/MViTv2_{T,S,B,L}.yaml``):
AdamW, base learning rate 2.5e-4 per 256 images scaled linearly with the global batch, weight decay 0.05 except on
norms, biases, rel-pos tables and the class token, 70 warm-up epochs of 300 then cosine to 1e-6, gradient clipping at
L2 norm 1.0, RandAugment ``rand-m9-n6-mstd0.5-inc1``, colour jitter 0.4 (timm applies it only when RandAugment is off,
as in the official code), random erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, and stochastic depth
(drop path) T 0.1, S 0.1, B 0.3, L 0.5.

``finetune`` starts from trained weights: layer-wise learning-rate decay 0.75, an EMA of the weights, 30 epochs with
5 of warm-up, a lower base learning rate (1e-4 per 256), and optionally frozen early stages (``freeze_stages``).

A recipe is changed by a small YAML file (``load_recipe_file``, read with ``yaml.safe_load``)::

    recipe: finetune          # the recipe to start from (default: imagenet)
    epochs: 10
    mixup: 0.0
    scale: [0.5, 1.0]

and the command-line flags (``--epochs``, ``--batch-size``, ``--lr``, ``--img-size``) change it last. Changing
``epochs`` without ``warmup_epochs`` keeps the warm-up's share of the schedule (70/300 for ``imagenet``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..utils.hints import did_you_mean

__all__ = ["DROP_PATH", "RECIPES", "Recipe", "RecipeError", "get_recipe", "load_recipe_file", "resolve_recipe"]

#: Stochastic depth of the official ImageNet-1k recipes per size (H has no in1k recipe: L's value).
DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.3, "large": 0.5, "huge": 0.5}


class RecipeError(ValueError):
    """A recipe name, recipe file or recipe value is invalid; the message names the fix."""


@dataclass
class Recipe:
    """Every training hyper-parameter. ``lr`` is derived: ``base_lr * batch_size / base_batch`` unless set."""

    name: str = "imagenet"
    # schedule and optimiser
    epochs: int = 300
    warmup_epochs: float = 70.0
    batch_size: int = 256  # global: all processes and accumulation steps together
    base_lr: float = 2.5e-4
    base_batch: int = 256
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    opt: str = "adamw"
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = 1.0
    # model
    drop_path: Optional[float] = None  # None: DROP_PATH of the model's size
    freeze_stages: int = 0
    ema: bool = False
    ema_decay: float = 0.9998
    # data
    img_size: int = 224
    crop_pct: float = 0.875  # evaluation: resize the short side to img_size / crop_pct, centre-crop img_size
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-n6-mstd0.5-inc1"
    color_jitter: float = 0.4
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def learning_rate(self) -> float:
        """The peak learning rate: ``lr`` if set, else ``base_lr`` scaled linearly to ``batch_size``."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / self.base_batch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["scale"] = list(self.scale)
        return d


RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": {},
    "finetune": dict(
        epochs=30, warmup_epochs=5.0, base_lr=1e-4, layer_decay=0.75, ema=True, auto_augment="rand-m9-mstd0.5-inc1"
    ),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Recipe) if f.name not in ("name", "extra")}


def get_recipe(name: str, size: str) -> Recipe:
    """The named recipe (``RECIPES``) for a model size (``tiny`` ... ``huge``)."""
    if name not in RECIPES:
        raise RecipeError(f"Unknown recipe {name!r}; choose from {', '.join(RECIPES)} (or give a --config file).")
    recipe = Recipe(name=name, **RECIPES[name])
    recipe.drop_path = DROP_PATH.get(size, 0.1)
    return recipe


def _coerce(key: str, value: Any, where: str) -> Any:
    f = _FIELDS[key]
    typ = str(f.type)
    if value is None:
        if "Optional" in typ:
            return None
        raise RecipeError(f"{where}: {key!r} cannot be null.")
    if key == "scale":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
            raise RecipeError(f"{where}: 'scale' must be two numbers [min, max], got {value!r}.")
        return (float(value[0]), float(value[1]))
    if typ.startswith(("int", "Optional[int]")) and (isinstance(value, bool) or not isinstance(value, int)):
        raise RecipeError(f"{where}: {key!r} must be an integer, got {value!r}.")
    if "float" in typ:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: {key!r} must be a number, got {value!r}.")
        return float(value)
    if typ == "bool" and not isinstance(value, bool):
        raise RecipeError(f"{where}: {key!r} must be true or false, got {value!r}.")
    if "str" in typ and not isinstance(value, str):
        raise RecipeError(f"{where}: {key!r} must be a string, got {value!r}.")
    return value


def _apply(recipe: Recipe, overrides: dict[str, Any], where: str) -> Recipe:
    for key, value in overrides.items():
        if key not in _FIELDS:
            hint = did_you_mean(key, _FIELDS, n=1)
            raise RecipeError(f"{where}: unknown recipe key {key!r}.{hint} Known keys: {', '.join(sorted(_FIELDS))}.")
        setattr(recipe, key, _coerce(key, value, where))
    return recipe


def load_recipe_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read a recipe YAML file (``yaml.safe_load``): a mapping of recipe keys, plus optional ``recipe: NAME``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"Cannot read config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"Config file {path} must hold a mapping of recipe keys (key: value lines).")
    return data


def resolve_recipe(
    size: str,
    recipe: Optional[str] = None,
    config: Optional[Union[str, Path]] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> Recipe:
    """The recipe ``recipe`` (or the config file's ``recipe:``, default ``imagenet``), changed by the config file,
    then by ``overrides`` (the command-line flags that were given; ``None`` sets a value to null)."""
    file_values = load_recipe_file(config) if config else {}
    file_values = dict(file_values)
    base = file_values.pop("recipe", None)
    if recipe and base and recipe != base:
        raise RecipeError(f"--recipe {recipe} conflicts with 'recipe: {base}' in {config}; give one of them.")
    result = get_recipe(recipe or base or "imagenet", size)
    base_epochs, base_warmup = result.epochs, result.warmup_epochs
    cli = dict(overrides or {})
    _apply(result, file_values, f"config file {config}")
    _apply(result, cli, "command line")
    if result.epochs != base_epochs and "warmup_epochs" not in file_values and "warmup_epochs" not in cli:
        # A shorter (or longer) schedule keeps the recipe's shape: 70 of 300 warm-up epochs stay 7/30 of the run.
        result.warmup_epochs = base_warmup * result.epochs / base_epochs
    _validate(result)
    return result


def _validate(r: Recipe) -> None:
    checks = [
        (r.epochs >= 1, f"epochs must be >= 1, got {r.epochs}"),
        (r.batch_size >= 1, f"batch_size must be >= 1, got {r.batch_size}"),
        (r.img_size >= 32, f"img_size {r.img_size} is smaller than the network's total stride (32): use at least 32"),
        (0 < r.crop_pct <= 1, f"crop_pct must be in (0, 1], got {r.crop_pct}"),
        (0 <= r.warmup_epochs <= r.epochs, f"warmup_epochs must be in 0..epochs, got {r.warmup_epochs}"),
        (r.learning_rate() > 0, f"the learning rate must be > 0, got {r.learning_rate()}"),
        (0 <= r.freeze_stages <= 4, f"freeze_stages must be 0..4, got {r.freeze_stages}"),
        (r.layer_decay is None or 0 < r.layer_decay <= 1, f"layer_decay must be in (0, 1], got {r.layer_decay}"),
        (0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {r.label_smoothing}"),
        (0 < r.scale[0] <= r.scale[1] <= 1, f"scale must satisfy 0 < min <= max <= 1, got {list(r.scale)}"),
    ]
    # Probabilities outside 0..1 are accepted silently by timm (7 acts as 1); say so instead.
    checks += [(0 <= getattr(r, k) <= 1, f"{k} is a probability and must be in 0..1, got {getattr(r, k)}")
               for k in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob")]
    checks += [(getattr(r, k) >= 0, f"{k} must be >= 0 (0 turns it off), got {getattr(r, k)}")
               for k in ("mixup", "cutmix", "color_jitter", "weight_decay")]
    for ok, message in checks:
        if not ok:
            raise RecipeError(message + ".")
