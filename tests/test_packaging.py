"""A wheel of mvit-det carries the detector configs (as detectron2's carries its model-zoo configs), so that the
detector zoo and the configs work from a plain ``pip install`` as they do from a checkout."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "output", "datasets", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".whl")

CHECK = r"""
import json, sys
from pathlib import Path
import mvit_det
from mvit_det.detection import zoo
from mvit_det.detection.run_config import load_config
site = Path(sys.argv[1]).resolve()
cards = [zoo.get_detector_card(n) for n in zoo.list_detectors()]
for card in cards:
    load_config(str(card.config_path))  # relative imports (..common) resolve inside the installed copy
toy = load_config(str(zoo.CONFIG_ROOT / "toy" / "mvitv2_t_maskrcnn_toy.py"))
print(json.dumps({
    "package": str(Path(mvit_det.__file__).resolve()),
    "config_root": str(zoo.CONFIG_ROOT.resolve()),
    "cards": len(cards),
    "all_files": all(c.config_path.resolve().is_relative_to(site) and c.config_path.is_file() for c in cards),
    "toy_classes": toy.model.roi_heads.num_classes,
}))
"""


def test_wheel_ships_the_configs_and_the_zoo_runs_from_it(tmp_path):
    src = tmp_path / "src"  # built from a copy: the build writes build/ and egg-info next to setup.py
    shutil.copytree(ROOT, src, ignore=SKIP)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dist), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("mvit_det-*.whl")

    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mvit_det/configs/")}
    expected = {f"mvit_det/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
                for p in (ROOT / "configs").rglob("*") if p.suffix in (".py", ".yaml")}
    assert expected and expected <= shipped

    site = tmp_path / "site"  # a pure-Python wheel installs by unpacking
    zipfile.ZipFile(wheel).extractall(site)
    run = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(site.resolve())  # the wheel's copy, not this checkout
    assert out["config_root"] == str((site / "mvit_det" / "configs").resolve())
    assert out["cards"] == 13 and out["all_files"] and out["toy_classes"] == 3
