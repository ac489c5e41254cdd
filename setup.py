"""Packaging for mvit-det. detectron2 is not a dependency here: see README, "Installation details"."""
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    # Parsed, not imported: importing mvit_det needs torch, which may not be installed yet.
    text = (ROOT / "mvit_det" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if match is None:
        raise RuntimeError("mvit_det/__init__.py must define __version__ = '...'")
    return match.group(1)


class BuildPyWithConfigs(build_py):
    """Ships the repository's configs/ inside the package, as mvit_det/configs, so that the detector zoo and the
    detector configs work from a wheel, as detectron2 ships its model-zoo configs; an editable install reads the
    checkout's configs/ itself (``mvit_det.detection.zoo.CONFIG_ROOT``)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(ROOT / "configs", Path(self.build_lib) / "mvit_det" / "configs", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(
    name="mvit-det",
    cmdclass={"build_py": BuildPyWithConfigs},
    version=read_version(),
    description="MViTv2 for Detectron2 detection and ImageNet classification",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # benchmarks: the side-by-side benchmark and reference models (tools/benchmark.py, tests)
    packages=find_packages(include=["mvit_det*", "benchmarks*"]),
    package_data={"mvit_det": ["classification/imagenet_classes.txt", "**/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pillow",
        "tqdm",
        "fvcore",
        "iopath",
        "pycocotools",
        "opencv-python-headless",
        "omegaconf>=2.1,<2.4",
        "hydra-core",
        "yacs",
        "termcolor",
        "tabulate",
        "cloudpickle",
        "matplotlib",
        "tensorboard",
        "timm>=1.0",  # classification training: tools/cls_train.py
        # detectron2.model_zoo imports pkg_resources, which setuptools 81 removed
        "setuptools<81",
    ],
    extras_require={"test": ["pytest", "timm==1.0.31", "scikit-image"], "demo": ["scikit-learn"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
