"""Built-in datasets, registered on import the way detectron2's ``detectron2/data/datasets/builtin.py`` does.

``import mvit_det.detection`` imports this module, so every program that uses this package (``tools/train_net.py``,
detectron2's own ``tools/lazyconfig_train_net.py`` or ``tools/analyze_model.py`` given a config of this repository,
a notebook) finds ``mvit_toy_train`` and ``mvit_toy_val`` in ``DatasetCatalog`` with their metadata. Registration
reads and writes nothing: the images are generated on the first ``DatasetCatalog.get`` (see ``mvit_det.data.toy``),
under ``$MVIT_DET_DATASETS`` (read now, at import) or else ``datasets/``.
"""
from detectron2.data import DatasetCatalog

from ..data.toy import TOY_DATASET_NAMES, register_toy_dataset

__all__ = ["register_all_builtin"]


def register_all_builtin() -> None:
    """Register the toy datasets unless the program registered those names itself before this import."""
    if not any(name in DatasetCatalog.list() for name in TOY_DATASET_NAMES):
        register_toy_dataset()


register_all_builtin()
