"""Input reading shared by classification, detection and evaluation."""
from .images import ImageNotFoundError, ImageReadError, load_image

__all__ = ["ImageNotFoundError", "ImageReadError", "load_image"]
