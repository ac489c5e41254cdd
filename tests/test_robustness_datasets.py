"""Robustness: bad COCO-format datasets give a clear error, or are filtered with a warning that gives the count.

Every case goes through ``mvit_det.data.register_coco_instances`` (what ``tools/train_net.py --register-coco``
uses) and detectron2's ``get_detection_dataset_dicts`` (what the train and test loaders call).
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("detectron2")
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts  # noqa: E402

from mvit_det.data import load_coco_instances, register_coco_instances  # noqa: E402

H, W = 100, 120


@pytest.fixture
def warnings_of_loader(capture_log):
    """Messages logged by mvit_det.data.coco."""
    with capture_log("mvit_det.data.coco") as messages:
        yield messages


@pytest.fixture
def names():
    """Unique dataset names, unregistered again after the test."""
    made = []

    def new() -> str:
        made.append(f"robust_{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for n in made:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        cv2.imwrite(str(root / f"{i}.jpg"), np.full((H, W, 3), 40 * i, np.uint8))
    return root


def _image(i: int, file_name: str | None = None) -> dict:
    return {"id": i + 1, "file_name": file_name or f"{i}.jpg", "height": H, "width": W}


def _ann(i: int, image_id: int, box: list[float], category_id: int = 1) -> dict:
    return {"id": i, "image_id": image_id, "bbox": box, "category_id": category_id, "area": box[2] * box[3], "iscrowd": 0}


def _write(path: Path, images: list, annotations: list, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"})):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return path


def test_missing_image_directory_and_annotation_file(tmp_path, images, names):
    good = _write(tmp_path / "a.json", [_image(0)], [_ann(1, 1, [10, 10, 20, 20])])
    name = names()
    with pytest.raises(FileNotFoundError, match=rf"Dataset '{name}': image directory {tmp_path}/nope does not exist\."):
        register_coco_instances(name, {}, str(good), str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=rf"annotation file {tmp_path}/missing.json does not exist\."):
        register_coco_instances(name, {}, str(tmp_path / "missing.json"), str(images))
    assert name not in DatasetCatalog.list()  # nothing half-registered


def test_empty_annotation_file(tmp_path, images, names):
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    name = names()
    register_coco_instances(name, {}, str(empty), str(images))
    with pytest.raises(ValueError, match=rf"annotation file {empty} is empty \(0 bytes\)\.$"):
        get_detection_dataset_dicts(name)


def test_annotation_file_that_is_not_json(tmp_path, images):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(Expecting property name enclosed in double "
                                         r"quotes at line 2, column 12\)\."):
        load_coco_instances(str(bad), str(images))


def test_annotation_file_without_images(tmp_path, images, names):
    name = names()
    register_coco_instances(name, {}, str(_write(tmp_path / "none.json", [], [])), str(images))
    with pytest.raises(ValueError, match=r"none.json lists no images\. A COCO instances file needs 'images'"):
        get_detection_dataset_dicts(name)


def test_images_referenced_but_absent_are_skipped_with_a_count(tmp_path, images, names, warnings_of_loader):
    listed = [_image(0), _image(1), _image(2, "gone_a.jpg"), _image(3, "sub/gone_b.jpg")]
    anns = [_ann(i + 1, i + 1, [10, 10, 20, 20]) for i in range(4)]
    name = names()
    register_coco_instances(name, {}, str(_write(tmp_path / "a.json", listed, anns)), str(images))
    dicts = get_detection_dataset_dicts(name)
    assert [Path(d["file_name"]).name for d in dicts] == ["0.jpg", "1.jpg"]
    assert (
        f"Dataset '{name}': 2 of 4 images listed in {tmp_path / 'a.json'} are missing under {images} and were "
        "skipped: gone_a.jpg, sub/gone_b.jpg"
    ) in warnings_of_loader

    # None there at all: the image directory is wrong, which is an error, not a warning.
    none_there = [_image(i, f"x{i}.jpg") for i in range(7)]
    with pytest.raises(ValueError, match=r"none of the 7 images listed in .*b.json exists under .*images \(e\.g\. "
                                         r"x0.jpg, x1.jpg, x2.jpg, x3.jpg, x4.jpg, \.\.\. and 2 more\)\. Check the image directory\."):
        load_coco_instances(str(_write(tmp_path / "b.json", none_there, [])), str(images))


def test_zero_area_and_out_of_image_boxes(tmp_path, images, names, warnings_of_loader):
    anns = [
        _ann(1, 1, [10, 10, 20, 20]),  # fine
        _ann(2, 1, [10, 10, 0, 20]),  # zero width
        _ann(3, 2, [30, 30, 15, -5]),  # negative height
        _ann(4, 2, [100, 80, 50, 50]),  # crosses the right and bottom border (W=120, H=100): clipped
        _ann(5, 3, [-10, -5, 30, 20]),  # crosses the left and top border: clipped
        _ann(6, 3, [200, 10, 20, 20]),  # entirely outside
        _ann(7, 4, [0, 0, W, H]),  # exactly the whole image: unchanged
    ]
    name = names()
    register_coco_instances(name, {}, str(_write(tmp_path / "a.json", [_image(i) for i in range(4)], anns)), str(images))
    by_file = {Path(d["file_name"]).name: [a["bbox"] for a in d["annotations"]] for d in get_detection_dataset_dicts(name)}
    assert by_file == {
        "0.jpg": [[10, 10, 20, 20]],
        "1.jpg": [[100.0, 80.0, 20.0, 20.0]],
        "2.jpg": [[0.0, 0.0, 20.0, 15.0]],
        "3.jpg": [[0, 0, W, H]],
    }
    assert f"Dataset '{name}': dropped 2 boxes with zero or negative width or height." in warnings_of_loader
    assert f"Dataset '{name}': dropped 1 boxes that lie entirely outside their image." in warnings_of_loader
    assert f"Dataset '{name}': clipped 2 boxes that extend beyond their image to the image border." in warnings_of_loader


def test_image_left_without_boxes_is_removed_by_detectron2_with_a_count(tmp_path, images, names, capture_log):
    anns = [_ann(1, 1, [10, 10, 20, 20]), _ann(2, 2, [10, 10, 0, 0])]
    name = names()
    register_coco_instances(name, {}, str(_write(tmp_path / "a.json", [_image(0), _image(1)], anns)), str(images))
    with capture_log("detectron2.data.build", logging.INFO) as messages:  # detectron2 logs this count at INFO
        dicts = get_detection_dataset_dicts(name)
    assert len(dicts) == 1
    assert "Removed 1 images with no usable annotations. 1 images left." in messages


def test_category_id_not_in_categories(tmp_path, images, names):
    anns = [_ann(1, 1, [10, 10, 20, 20]), _ann(2, 1, [5, 5, 9, 9], 7), _ann(3, 2, [5, 5, 9, 9], 7), _ann(4, 2, [1, 1, 5, 5], 0)]
    name = names()
    register_coco_instances(name, {}, str(_write(tmp_path / "a.json", [_image(0), _image(1)], anns)), str(images))
    with pytest.raises(ValueError) as err:
        get_detection_dataset_dicts(name)
    assert str(err.value) == (
        f"Dataset '{name}': {tmp_path / 'a.json'}: 3 annotations use category ids that are not in the file's "
        "'categories': 0 (1x), 7 (2x). Known category ids: [1, 2]. Add the missing categories to 'categories' or "
        "fix the annotations' category_id."
    )


def test_clean_dataset_loads_unchanged(tmp_path, images, names, warnings_of_loader):
    """The checks change nothing on a clean file: same dicts as detectron2's own loader, and no warnings."""
    from detectron2.data.datasets import load_coco_json

    anns = [_ann(i + 1, i % 4 + 1, [5 + i, 6, 30, 40], 1 + i % 2) for i in range(8)]
    path = _write(tmp_path / "a.json", [_image(i) for i in range(4)], anns)
    ours = load_coco_instances(str(path), str(images))
    assert ours == load_coco_json(str(path), str(images))
    assert warnings_of_loader == []
    assert not re.search("missing|dropped|clipped", " ".join(warnings_of_loader))


def test_train_net_register_coco_errors_exit_2(tmp_path, images):
    """tools/train_net.py checks --register-coco paths before it starts any worker: one line, exit code 2."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    good = _write(tmp_path / "a.json", [_image(0)], [_ann(1, 1, [10, 10, 20, 20])])
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONWARNINGS="ignore")
    for json_file, image_root, message in [
        (good, tmp_path / "no_images", f"train_net: --register-coco mine: image directory {tmp_path / 'no_images'} does not exist."),
        (tmp_path / "no.json", images, f"train_net: --register-coco mine: annotation file {tmp_path / 'no.json'} does not exist."),
    ]:  # fmt: skip
        proc = subprocess.run(
            [sys.executable, str(repo / "tools" / "train_net.py"), "--config", str(repo / "configs/toy/mvitv2_t_maskrcnn_toy.py"),
             "--register-coco", "mine", str(json_file), str(image_root), "dataloader.train.dataset.names=mine"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr


# -- classification folders walked safely (issue 17, item 15) ---------------------------------------------------
def test_classification_folder_walk_survives_links_and_odd_names(tmp_path, caplog):
    """A link loop ends, each image counts once (also when reached through a link), broken links are reported,
    and a file name that is not valid UTF-8 still opens."""
    import os

    from PIL import Image

    from mvit_det.classification.datasets import build_eval_dataset

    val = tmp_path / "val"
    (val / "n0").mkdir(parents=True)
    (val / "n1").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(val / "n0" / "a.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(val / "n1" / "b.png")
    (val / "n0" / "loop").symlink_to(val / "n0", target_is_directory=True)  # n0/loop/loop/... forever
    (val / "n1" / "same_as_a.png").symlink_to(val / "n0" / "a.png")
    (val / "n1" / "broken.png").symlink_to(tmp_path / "gone.png")
    odd = os.path.join(os.fsencode(val / "n1"), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (40, 30), (10, 10, 200)).save(odd, format="PNG")

    with caplog.at_level(logging.WARNING):
        dataset = build_eval_dataset(val, num_classes=2)
    names = sorted(os.path.relpath(p, val) for p, _ in dataset.samples)
    assert names == ["n0/a.png", "n1/b.png", os.fsdecode(b"n1/caf\xe9.png")]  # each image once; the walk ended
    assert "a link to a folder that was already walked" in caplog.text
    assert "broken.png: a broken link" in caplog.text
    assert "same_as_a.png: the same file as another path already listed (a link)" in caplog.text
    odd_sample = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith(os.fsdecode(b"caf\xe9.png")))
    image, label, _, error = dataset[odd_sample]
    assert error is None and label == 1 and image.shape == (3, 224, 224)
