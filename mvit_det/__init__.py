"""mvit-det: MViTv2 for ImageNet classification and Detectron2 detection."""
__version__ = "0.1.0"  # first: submodules import it

from .hub import get_model  # noqa: E402
from .models import ARCHS, MViTv2, get_arch, list_models  # noqa: E402

__all__ = ["ARCHS", "MViTv2", "get_arch", "get_model", "inference_model", "list_models", "add_mvitv2_config"]


def __getattr__(name: str):
    # Lazy so that `import mvit_det` needs neither PIL nor detectron2.
    if name == "inference_model":
        from .classification import inference_model

        return inference_model
    if name == "add_mvitv2_config":
        from .detection import add_mvitv2_config

        return add_mvitv2_config
    raise AttributeError(f"module 'mvit_det' has no attribute {name!r}")
