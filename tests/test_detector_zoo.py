"""The detector zoo: the 13 published MViTv2 detectors (names, URLs, configs, classes, published AP), and
``get_detector``'s download through the shared hash-checked cache, against a local http.server on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import time

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import MetadataCatalog
from test_download import LocalServer, closed_port

from mvit_det.checkpoint import DownloadError
from mvit_det.checkpoint.io import cache_path
from mvit_det.detection import zoo
from mvit_det.detection.zoo import DETECTORS, get_detector, get_detector_card, list_detectors

# detectron2's projects/MViTv2 and projects/ViTDet READMEs: name -> (dataset, size, box AP, mask AP, URL path)
PUBLISHED = {
    "mask_rcnn_mvitv2_t_3x": ("COCO", "tiny", 48.3, 43.8, "MViTv2/mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl"),
    "cascade_mask_rcnn_mvitv2_t_3x": ("COCO", "tiny", 52.2, 45.0, "MViTv2/cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl"),
    "cascade_mask_rcnn_mvitv2_s_3x": ("COCO", "small", 53.2, 46.0, "MViTv2/cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl"),
    "cascade_mask_rcnn_mvitv2_b_3x": ("COCO", "base", 54.1, 46.7, "MViTv2/cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl"),
    "cascade_mask_rcnn_mvitv2_b_in21k_3x": ("COCO", "base", 54.9, 47.4, "MViTv2/cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl"),
    "cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep": ("COCO", "large", 55.8, 48.3, "MViTv2/cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl"),
    "cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x": ("COCO", "huge", 56.1, 48.5, "MViTv2/cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl"),
    "vitdet_coco_cascade_mask_rcnn_mvitv2_b_in21k_100ep": ("COCO", "base", 55.6, 48.1, "ViTDet/COCO/cascade_mask_rcnn_mvitv2_b_in21k/f325820315/model_final_8c3da3.pkl"),
    "vitdet_coco_cascade_mask_rcnn_mvitv2_l_in21k_50ep": ("COCO", "large", 55.7, 48.3, "ViTDet/COCO/cascade_mask_rcnn_mvitv2_l_in21k/f325607715/model_final_2141b0.pkl"),
    "vitdet_coco_cascade_mask_rcnn_mvitv2_h_in21k_36ep": ("COCO", "huge", 55.9, 48.3, "ViTDet/COCO/cascade_mask_rcnn_mvitv2_h_in21k/f326187358/model_final_2234d7.pkl"),
    "vitdet_lvis_cascade_mask_rcnn_mvitv2_b_in21k_100ep": ("LVIS v1", "base", 46.3, 42.0, "ViTDet/LVIS/cascade_mask_rcnn_mvitv2_b_in21k/329477206/model_final_a00567.pkl"),
    "vitdet_lvis_cascade_mask_rcnn_mvitv2_l_in21k_50ep": ("LVIS v1", "large", 49.4, 44.2, "ViTDet/LVIS/cascade_mask_rcnn_mvitv2_l_in21k/329661552/model_final_7838a5.pkl"),
    "vitdet_lvis_cascade_mask_rcnn_mvitv2_h_in21k_50ep": ("LVIS v1", "huge", 49.5, 44.1, "ViTDet/LVIS/cascade_mask_rcnn_mvitv2_h_in21k/330445165/model_final_ad4220.pkl"),
}  # fmt: skip
NAME = "mask_rcnn_mvitv2_t_3x"


def test_thirteen_published_detectors():
    assert list_detectors() == list(PUBLISHED)
    assert list_detectors("vitdet_lvis_*") == [n for n in PUBLISHED if n.startswith("vitdet_lvis_")]
    for name, (dataset, _, box, mask, path) in PUBLISHED.items():
        card = get_detector_card(name)
        assert card.url == "https://dl.fbaipublicfiles.com/detectron2/" + path
        assert (card.dataset, card.box_ap, card.mask_ap) == (dataset, box, mask)
        assert card.md5_prefix == path[-10:-4] and card.file_name == path.rsplit("/", 1)[1]
        assert card.config_path.is_file()
        assert card.num_classes == {"COCO": 80, "LVIS v1": 1203}[dataset]
        assert card.recipe == ("ViTDet" if name.startswith("vitdet_") else "MViTv2")
    # each URL is a different file, so the shared cache never confuses two detectors
    assert len({c.file_name for c in DETECTORS.values()}) == 13


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_config_builds_the_published_recipe(name):
    card = get_detector_card(name)
    dataset, size, *_ = PUBLISHED[name]
    cfg = LazyConfig.load(str(card.config_path))
    model = cfg.model
    assert model.backbone.bottom_up.size == size
    assert model.roi_heads.num_classes == card.num_classes
    assert model.input_format == "RGB" and cfg.dataloader.test.mapper.image_format == "RGB"
    # the config's test dataset has exactly the card's classes (what the predictor labels detections with)
    assert MetadataCatalog.get(cfg.dataloader.test.dataset.names).thing_classes == card.classes
    cascade = "box_predictors" in model.roi_heads
    assert cascade == name.startswith(("cascade", "vitdet"))
    # 2 convs in the RPN head for the cascade recipes; detectron2's Mask R-CNN T keeps the default single conv
    assert model.proposal_generator.head.get("conv_dims", [-1]) == ([-1, -1] if cascade else [-1])
    heads = list(model.roi_heads.box_heads) if cascade else [model.roi_heads.box_head]
    test_aug = cfg.dataloader.test.mapper.augmentations[0]
    if card.recipe == "ViTDet":
        assert model.backbone.norm == "LN" and model.backbone.square_pad == 1024
        assert all(h.conv_norm == "LN" for h in heads) and model.roi_heads.mask_head.conv_norm == "LN"
        assert (test_aug.short_edge_length, test_aug.max_size) == (1024, 1024)
        assert cfg.optimizer.params.overrides == {"pos_embed": {"weight_decay": 0.0}}
    else:
        assert model.backbone.get("norm", "") == "" and model.backbone.get("square_pad", 0) == 0
        assert (test_aug.short_edge_length, test_aug.max_size) == (800, 1333)
        if cascade:
            assert all(h.conv_norm == "naiveSyncBN_N" for h in heads)
    lsj = "lsj" in name or card.recipe == "ViTDet"
    assert any("ResizeScale" in str(a._target_) for a in cfg.dataloader.train.mapper.augmentations) == lsj
    if cascade:
        predictors = model.roi_heads.box_predictors
        assert [p.box2box_transform.weights for p in predictors] == [[10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
        assert all(p.cls_agnostic_bbox_reg for p in predictors)
    if dataset == "LVIS v1":
        assert cfg.dataloader.test.dataset.names == "lvis_v1_val"
        for p in model.roi_heads.box_predictors:
            assert p.use_sigmoid_ce and p.use_fed_loss
            assert (p.test_score_thresh, p.test_topk_per_image) == (0.02, 300)
            weights = p.get_fed_loss_cls_weights()  # from detectron2's built-in LVIS image counts
            assert weights.shape == (1203,) and (weights > 0).all()
        assert cfg.dataloader.evaluator.max_dets_per_image == 300
    if size == "huge":
        assert model.backbone.bottom_up.act_checkpoint


def test_class_names():
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    coco, lvis = zoo.class_names("COCO"), zoo.class_names("LVIS v1")
    assert len(coco) == 80 and coco[:3] == ["person", "bicycle", "car"] and coco[-1] == "toothbrush"
    assert len(lvis) == 1203 == len(LVIS_CATEGORIES)
    assert lvis == MetadataCatalog.get("lvis_v1_val").thing_classes


def test_unknown_name_did_you_mean():
    with pytest.raises(ValueError, match=r"Unknown detector 'cascade_mask_rcnn_mvitv2_t'\. Did you mean "
                                         r"'cascade_mask_rcnn_mvitv2_t_3x'"):  # fmt: skip
        get_detector("cascade_mask_rcnn_mvitv2_t")
    with pytest.raises(ValueError, match="Available: mask_rcnn_mvitv2_t_3x, "):
        get_detector_card("yolo")


# ---- download path ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_pkl(tmp_path_factory):
    """A detectron2-style model-zoo .pkl of the mask_rcnn_mvitv2_t_3x model (seeded random weights), named
    ``model_final_<md5[:6]>.pkl`` like detectron2's files, plus a copy whose name carries a wrong hash."""
    from mvit_det.detection.builders import build_model
    from mvit_det.detection.run_config import load_config

    torch.manual_seed(3)
    model = build_model(load_config(str(get_detector_card(NAME).config_path)))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("www")
    tmp = folder / "upload.pkl"
    with open(tmp, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    digest = hashlib.md5(tmp.read_bytes()).hexdigest()
    good = tmp.rename(folder / f"model_final_{digest[:6]}.pkl")
    bad = "abcdef" if not digest.startswith("abcdef") else "fedcba"
    shutil.copy(good, folder / f"model_final_{bad}.pkl")
    return state, folder, good.name, f"model_final_{bad}.pkl"


def _served(monkeypatch, url: str) -> None:
    monkeypatch.setitem(DETECTORS, NAME, dataclasses.replace(DETECTORS[NAME], url=url))


def test_download_checks_md5_caches_and_works_offline(published_pkl, ckpt_hub_dir, monkeypatch):
    state, folder, name, _ = published_pkl
    server = LocalServer(folder)
    try:
        _served(monkeypatch, f"{server.url}/{name}")
        first = get_detector(NAME, pretrained=True, device="cpu", progress=False)
    finally:
        server.stop()
    # the shared cache (mvit_det.checkpoint.cache_path), and no partial file
    assert [p for p in ckpt_hub_dir.rglob("*") if p.is_file()] == [cache_path(f"{server.url}/{name}")]
    loaded = first.model.state_dict()
    assert all(torch.equal(loaded[k], torch.as_tensor(v)) for k, v in state.items())
    assert first.metadata.thing_classes == zoo.class_names("COCO") and first.card.name == NAME

    # The server is gone: the cached file is used.
    second = get_detector(NAME, pretrained=True, device="cpu", progress=False)
    assert all(torch.equal(second.model.state_dict()[k], v) for k, v in loaded.items())


def test_wrong_md5_is_refused_and_not_cached(published_pkl, ckpt_hub_dir, monkeypatch):
    _, folder, _, bad = published_pkl
    server = LocalServer(folder)
    try:
        _served(monkeypatch, f"{server.url}/{bad}")
        with pytest.raises(DownloadError, match=r"its MD5 [0-9a-f]{12}\.\.\. does not start with '(abcdef|fedcba)'.*"
                                                r"Nothing was cached"):  # fmt: skip
            get_detector(NAME, pretrained=True, device="cpu", progress=False)
    finally:
        server.stop()
    assert [p for p in ckpt_hub_dir.rglob("*") if p.is_file()] == []


def test_offline_message_names_the_manual_download(ckpt_hub_dir, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/model_final_1a1c30.pkl"
    _served(monkeypatch, url)
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        get_detector(NAME, pretrained=True, device="cpu", progress=False)
    assert time.monotonic() - start < 15
    msg = str(err.value)
    assert msg.startswith(f"Could not download {url}: ")
    assert "pretrained='/path/to/model_final_1a1c30.pkl'" in msg and str(cache_path(url)) in msg


def test_local_checkpoint_path(published_pkl, ckpt_hub_dir):
    state, folder, name, _ = published_pkl
    p = get_detector(NAME, pretrained=str(folder / name), device="cpu")
    assert torch.equal(p.model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       torch.as_tensor(state["roi_heads.box_predictor.cls_score.weight"]))  # fmt: skip
    assert not ckpt_hub_dir.exists()  # a local file is not copied into the cache
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_detector(NAME, pretrained=str(folder / "nope.pkl"), device="cpu")


def test_demo_model_flag_writes_coco_categories(published_pkl, tmp_path, capsys):
    """``tools/demo.py --model NAME`` works as --config does; the JSON carries COCO's own category ids."""
    import cv2
    from pycocotools.coco import COCO
    from skimage import data as skdata
    from test_demo_batch import demo

    _, folder, name, _ = published_pkl
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), cv2.resize(skdata.astronaut(), (160, 120))[:, :, ::-1])
    out = tmp_path / "res.json"
    rc = demo.main(["--model", NAME, "--weights", str(folder / name), "--input", str(image), "--json", str(out),
                    "--device", "cpu", "--no-progress", "--opts", "model.roi_heads.box_predictor.test_score_thresh=0.0",
                    "dataloader.test.mapper.augmentations.0.short_edge_length=120",
                    "dataloader.test.mapper.augmentations.0.max_size=160"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    coco = COCO(str(out))
    cats = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    assert len(cats) == 80 and cats["person"] == 1 and cats["toothbrush"] == 90
    assert len(coco.anns) == 100 and {a["category_id"] for a in coco.anns.values()} <= set(cats.values())
    assert coco.imgs[1]["height"] == 120 and coco.imgs[1]["width"] == 160
