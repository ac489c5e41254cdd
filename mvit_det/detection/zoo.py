"""The published MViTv2 detectors, by name: ``list_detectors()``, ``get_detector_card(name)``, ``get_detector(name)``.

Thirteen COCO / LVIS detectors with an MViTv2 backbone are published by detectron2: the seven of projects/MViTv2
(Mask R-CNN T; Cascade Mask R-CNN T, S, B, B-in21k; L and H with large-scale jitter) and the six of projects/ViTDet
that use an MViTv2 backbone (Cascade Mask R-CNN B, L, H on COCO and on LVIS v1, ViTDet recipe). Each entry names
the LazyConfig of this repository that builds the same network (``configs/...``), the checkpoint URL, the dataset
and its classes, and detectron2's published box and mask AP. The names are those of detectron2's config files
(ViTDet ones prefixed ``vitdet_coco_`` / ``vitdet_lvis_``).

``get_detector(name)`` downloads the checkpoint with :func:`mvit_det.checkpoint.download` (the same cache, atomic
write and offline message as ``get_model`` for the classifiers), checks the MD5 prefix that detectron2 puts in
its file names (``model_final_<md5[:6]>.pkl``), and returns a ready :class:`~mvit_det.detection.predictor.LazyPredictor`
whose ``metadata.thing_classes`` are the dataset's class names.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from detectron2.data.catalog import Metadata
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from ..checkpoint import DownloadError, download
from ..checkpoint.io import cache_path, is_url
from ..utils.hints import did_you_mean
from .predictor import LazyPredictor
from .run_config import load_config

__all__ = [
    "COUNTED_GFLOPS",
    "DETECTORS",
    "PUBLISHED_GFLOPS",
    "DetectorCard",
    "class_names",
    "get_detector",
    "get_detector_card",
    "list_detectors",
]

_D2 = "https://dl.fbaipublicfiles.com/detectron2/"
#: The detector configs: the copy a wheel ships inside the package (setup.py), else ``configs/`` of the checkout.
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_ROOT = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class DetectorCard:
    """One published detector."""

    name: str
    #: LazyConfig of this repository, relative to ``configs/``
    config: str
    url: str
    #: "COCO" or "LVIS v1"
    dataset: str
    #: "MViTv2" (projects/MViTv2) or "ViTDet" (projects/ViTDet)
    recipe: str
    method: str
    pretrain: str
    epochs: int
    #: detectron2's published COCO val2017 / LVIS v1 val AP
    box_ap: float
    mask_ap: float
    #: detectron2's config, relative to its projects/ folder
    detectron2_config: str

    @property
    def config_path(self) -> Path:
        return CONFIG_ROOT / self.config

    @property
    def num_classes(self) -> int:
        return len(class_names(self.dataset))

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def md5_prefix(self) -> Optional[str]:
        """detectron2's model-zoo file names end in the first hex digits of the file's MD5."""
        m = re.search(r"_([0-9a-f]{6,32})\.pkl$", self.file_name)
        return m.group(1) if m else None

    @property
    def classes(self) -> list[str]:
        return class_names(self.dataset)

    @property
    def published_gflops(self) -> Optional[float]:
        """detectron2's README figure (projects/MViTv2 only; the ViTDet README publishes none)."""
        return PUBLISHED_GFLOPS.get(self.name)

    @property
    def counted_gflops(self) -> Optional[tuple[float, float]]:
        """Counted here (see ``COUNTED_GFLOPS``): (no detection, 100 detections)."""
        return COUNTED_GFLOPS.get(self.name)


def _mvitv2(name, config, path, method, pretrain, epochs, box, mask):
    return DetectorCard(name, config, _D2 + "MViTv2/" + path, "COCO", "MViTv2", method, pretrain, epochs, box, mask,
                        f"MViTv2/configs/{name}.py")  # fmt: skip


def _vitdet(dataset, size, epochs, path, box, mask):
    folder = {"COCO": "coco", "LVIS v1": "lvis"}[dataset]
    d2 = f"cascade_mask_rcnn_mvitv2_{size}_in21k_{epochs}ep"
    return DetectorCard(
        f"vitdet_{folder}_{d2}", f"vitdet/{folder}/mvitv2_{size}_in21k_cascade.py", _D2 + "ViTDet/" + path, dataset,
        "ViTDet", "Cascade Mask R-CNN, ViTDet", "IN21K", epochs, box, mask,
        f"ViTDet/configs/{folder.upper()}/{d2}.py",
    )  # fmt: skip


_CASCADE = "Cascade Mask R-CNN"
DETECTORS: dict[str, DetectorCard] = {
    c.name: c
    for c in [
        _mvitv2("mask_rcnn_mvitv2_t_3x", "mvitv2_t_maskrcnn.py",
                "mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl", "Mask R-CNN", "IN1K", 36, 48.3, 43.8),
        _mvitv2("cascade_mask_rcnn_mvitv2_t_3x", "mvitv2_t_cascade.py",
                "cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl", _CASCADE, "IN1K", 36, 52.2, 45.0),
        _mvitv2("cascade_mask_rcnn_mvitv2_s_3x", "mvitv2_s_cascade.py",
                "cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl", _CASCADE, "IN1K", 36, 53.2, 46.0),
        _mvitv2("cascade_mask_rcnn_mvitv2_b_3x", "mvitv2_b_cascade.py",
                "cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl", _CASCADE, "IN1K", 36, 54.1, 46.7),
        _mvitv2("cascade_mask_rcnn_mvitv2_b_in21k_3x", "mvitv2_b_in21k_cascade.py",
                "cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl", _CASCADE, "IN21K", 36,
                54.9, 47.4),
        _mvitv2("cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep", "mvitv2_l_cascade_lsj.py",
                "cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl", _CASCADE + ", LSJ",
                "IN21K", 50, 55.8, 48.3),
        _mvitv2("cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x", "mvitv2_h_cascade_lsj.py",
                "cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl", _CASCADE + ", LSJ",
                "IN21K", 36, 56.1, 48.5),
        _vitdet("COCO", "b", 100, "COCO/cascade_mask_rcnn_mvitv2_b_in21k/f325820315/model_final_8c3da3.pkl", 55.6, 48.1),
        _vitdet("COCO", "l", 50, "COCO/cascade_mask_rcnn_mvitv2_l_in21k/f325607715/model_final_2141b0.pkl", 55.7, 48.3),
        _vitdet("COCO", "h", 36, "COCO/cascade_mask_rcnn_mvitv2_h_in21k/f326187358/model_final_2234d7.pkl", 55.9, 48.3),
        _vitdet("LVIS v1", "b", 100, "LVIS/cascade_mask_rcnn_mvitv2_b_in21k/329477206/model_final_a00567.pkl", 46.3, 42.0),
        _vitdet("LVIS v1", "l", 50, "LVIS/cascade_mask_rcnn_mvitv2_l_in21k/329661552/model_final_7838a5.pkl", 49.4, 44.2),
        _vitdet("LVIS v1", "h", 50, "LVIS/cascade_mask_rcnn_mvitv2_h_in21k/330445165/model_final_ad4220.pkl", 49.5, 44.1),
    ]  # fmt: skip
}


#: detectron2's projects/MViTv2 README, "FLOPS" column.
PUBLISHED_GFLOPS: dict[str, float] = {
    "mask_rcnn_mvitv2_t_3x": 279, "cascade_mask_rcnn_mvitv2_t_3x": 701, "cascade_mask_rcnn_mvitv2_s_3x": 748,
    "cascade_mask_rcnn_mvitv2_b_3x": 814, "cascade_mask_rcnn_mvitv2_b_in21k_3x": 814,
    "cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep": 1519, "cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x": 3084,
}  # fmt: skip
#: GFLOPs counted by ``python tools/analyze_model.py --zoo`` (detectron2's ``FlopCountAnalysis``, plain fvcore, one
#: multiply-accumulate = one FLOP) on the zoo's input (``mvit_det.detection.analysis.ZOO_INPUTS``: a 640x427
#: photograph, 800x1199 after the configs' test resize), random weights: (no detection, 100 detections). The
#: mask head runs once per detection, so a trained model on COCO lies in between; see the README.
COUNTED_GFLOPS: dict[str, tuple[float, float]] = {
    "mask_rcnn_mvitv2_t_3x": (214.9, 267.9),
    "cascade_mask_rcnn_mvitv2_t_3x": (634.3, 687.3),
    "cascade_mask_rcnn_mvitv2_s_3x": (679.7, 732.7),
    "cascade_mask_rcnn_mvitv2_b_3x": (742.6, 795.6),
    "cascade_mask_rcnn_mvitv2_b_in21k_3x": (742.6, 795.6),
    "cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep": (1372.0, 1425.1),
    "cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x": (2905.1, 2958.1),
}


@lru_cache(maxsize=None)
def _class_names(dataset: str) -> tuple[str, ...]:
    if dataset == "COCO":
        return tuple(c["name"] for c in COCO_CATEGORIES if c["isthing"])  # sorted by COCO id, 80 classes
    if dataset == "LVIS v1":
        # 1203 classes, named as detectron2's LVIS metadata names them (the first synonym)
        return tuple(c["synonyms"][0] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"]))
    raise ValueError(f"Unknown dataset {dataset!r}: 'COCO' or 'LVIS v1'.")


def class_names(dataset: str) -> list[str]:
    """The class names of "COCO" (80, detectron2's builtin metadata) or "LVIS v1" (1203, from
    ``detectron2.data.datasets.lvis_v1_categories``, first synonym as in detectron2's metadata), in model output
    order."""
    return list(_class_names(dataset))


def list_detectors(pattern: str = "*") -> list[str]:
    """Names accepted by ``get_detector``, optionally filtered by a glob pattern (e.g. ``"vitdet_lvis_*"``)."""
    return [n for n in DETECTORS if fnmatch(n, pattern)]


def get_detector_card(name: str) -> DetectorCard:
    """The card of a published detector: config, URL, dataset and classes, published AP. Unknown names get a
    did-you-mean and the list of names."""
    if name in DETECTORS:
        return DETECTORS[name]
    hint = did_you_mean(name, DETECTORS, cutoff=0.5)
    raise ValueError(f"Unknown detector {name!r}.{hint} Available: {', '.join(DETECTORS)}.")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_checkpoint(url: str, *, progress: bool = True) -> Path:
    """Download a detectron2 model-zoo checkpoint into the shared cache (``mvit_det.checkpoint.download``) and
    check the MD5 prefix in its file name. A fresh download with the wrong hash is removed from the cache; a wrong
    file already in the cache is refused with its path."""
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    cached = cache_path(url).is_file()
    path = Path(download(url, progress=progress))
    m = re.search(r"_([0-9a-f]{6,32})\.pkl$", name)
    if m is not None:
        digest = _md5(path)
        if not digest.startswith(m.group(1)):
            if not cached:
                os.unlink(path)
                where = "Nothing was cached; try again."
            else:
                where = f"Delete {path} and try again, or pass the right file with pretrained='/path/to/{name}' (--weights on the command line)."
            raise DownloadError(
                f"Checkpoint {name}: its MD5 {digest[:12]}... does not start with {m.group(1)!r} (the hash in the file "
                f"name), so it is corrupt or not the published file. {where}"
            )
    return path


def get_detector(
    name: str,
    pretrained: Union[bool, str, os.PathLike] = True,
    device: Optional[str] = None,
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    tta: Union[bool, Mapping] = False,
    opts: Sequence[str] = (),
    progress: bool = True,
):
    """A ready predictor for a published detector.

    Args:
        name: one of :func:`list_detectors`.
        pretrained: ``True`` downloads the published checkpoint into the torch hub cache (once; MD5-checked). A path
            or URL loads that file instead (a detectron2 ``.pkl``/``.pth`` or a model trained with this package).
            ``False`` keeps random weights (with a warning; for tests).
        device: default CUDA if available, else CPU.
        batch_size, precision, tta: see :class:`~mvit_det.detection.predictor.LazyPredictor`.
        opts: LazyConfig overrides, ``key=value`` (e.g. ``model.roi_heads.box_predictor.test_score_thresh=0.3``).

    Returns a :class:`~mvit_det.detection.predictor.LazyPredictor` (BGR uint8 image or list of images in,
    ``{"instances": Instances}`` out) with ``metadata.thing_classes`` set to the dataset's classes and ``card``
    set to the :class:`DetectorCard`.
    """
    card = get_detector_card(name)
    if not card.config_path.is_file():
        raise FileNotFoundError(
            f"Config {card.config_path} of detector {name!r} is missing: this install of mvit-det has neither the "
            "configs/ folder of a checkout nor the copy a wheel ships; reinstall it (pip install mvit-det from a "
            "wheel or a clone, or pip install -e . in a clone)."
        )
    if pretrained is True:
        weights = str(fetch_checkpoint(card.url, progress=progress))
    elif pretrained is False or pretrained is None:
        weights = ""
    elif is_url(str(pretrained)):
        weights = str(fetch_checkpoint(str(pretrained), progress=progress))
    else:
        weights = os.fspath(pretrained)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Checkpoint {weights} for detector {name!r} does not exist.")
    cfg = load_config(str(card.config_path), opts)
    predictor = LazyPredictor(cfg, weights=weights, device=device, batch_size=batch_size, precision=precision, tta=tta)
    meta = predictor.metadata
    if list(meta.get("thing_classes", [])) != card.classes:  # e.g. the dataset was re-registered by the user

        predictor.metadata = Metadata(name=card.dataset, thing_classes=card.classes)
    predictor.card = card
    return predictor
