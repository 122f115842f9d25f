"""models/data/pretrain.py: the images MAE pre-trains on (a folder, registered datasets) and
MAE's augmentation."""
import logging
import os

import models  # noqa: F401  (before detectron2)
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from PIL import Image

from models.data.pretrain import MAEAugmentation, image_folder_records, pretrain_images


@pytest.fixture
def folder(tmp_path):
    """3 images (RGB PNG, grayscale JPEG, RGBA PNG in a subfolder), 3 files that are not
    readable images (text, empty, a PNG cut after its signature) and a hidden file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(tmp_path / "sub" / "c.png")
    (tmp_path / "labels.txt").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes((tmp_path / "b.png").read_bytes()[:12])
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    return tmp_path


def test_a_folder_gives_its_images_sorted_and_skips_unreadable_files_with_a_count(folder, caplog):
    with caplog.at_level(logging.WARNING):
        records = image_folder_records(str(folder))
    assert [(r["file_name"], r["width"], r["height"]) for r in records] == [
        (str(folder / "a.jpg"), 30, 50), (str(folder / "b.png"), 60, 40), (str(folder / "sub" / "c.png"), 32, 32)]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 of 6 files that are not readable images" in warning
    assert "cut.png" in warning and "empty.jpg" in warning


def test_symbolic_links_are_followed_but_each_file_is_listed_once(folder, tmp_path_factory):
    os.symlink(folder, folder / "sub" / "loop")  # a link back up: a loop
    os.symlink(folder / "sub", folder / "alias")  # a second way to the same folder
    other = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (8, 8)).save(other / "d.png")
    os.symlink(other, folder / "linked")  # a folder elsewhere: followed
    names = [os.path.relpath(r["file_name"], folder) for r in image_folder_records(str(folder))]
    assert names == ["a.jpg", "alias/c.png", "b.png", "linked/d.png"]


def test_several_folders_and_a_file_for_a_folder(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("second")
    Image.new("RGB", (8, 8)).save(other / "e.png")
    assert len(pretrain_images(folder=[str(folder), str(other)])) == 4
    with pytest.raises(NotADirectoryError, match=r"image folder .*b\.png' is a file, not a folder"):
        pretrain_images(folder=str(folder / "b.png"))


def test_a_folder_without_images_or_a_missing_one_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"holds no readable image \(1 files\)"):
        image_folder_records(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere.* does not exist"):
        image_folder_records(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="needs folder=.* or names="):
        pretrain_images()


def test_registered_datasets_give_their_images_after_the_folder(folder, toy_coco_writer, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_pretrain")
    json_file = toy_coco_writer(root)
    from detectron2.data.datasets import register_coco_instances
    register_coco_instances("pretrain_toy", {}, str(json_file), str(root / "images"))
    try:
        records = pretrain_images(folder=str(folder), names="pretrain_toy")
    finally:
        DatasetCatalog.remove("pretrain_toy")
    assert len(records) == 3 + 8
    assert records[3]["file_name"].startswith(str(root / "images")) and set(records[3]) == {
        "file_name", "width", "height"}


def test_the_augmentation_gives_square_rgb_crops_and_one_noise_value_per_patch(folder):
    augment = MAEAugmentation(img_size=32, patch_size=8)
    torch.manual_seed(0)
    gray = augment({"file_name": str(folder / "a.jpg")})
    rgba = augment({"file_name": str(folder / "sub" / "c.png")})
    for sample in (gray, rgba):
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
        assert sample["mask_noise"].shape == (16,)
    assert torch.equal(gray["image"][0], gray["image"][1])  # grayscale: three equal channels
    torch.manual_seed(0)
    again = augment({"file_name": str(folder / "a.jpg")})
    assert torch.equal(again["image"], gray["image"]) and torch.equal(again["mask_noise"], gray["mask_noise"])


def test_whole_image_crops_and_flips_are_exact(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "square.png")
    record = {"file_name": str(tmp_path / "square.png")}
    whole = MAEAugmentation(img_size=32, patch_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(record)
    flipped = MAEAugmentation(img_size=32, patch_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(record)
    assert torch.equal(whole["image"], torch.from_numpy(pixels).permute(2, 0, 1))  # crop = the image, same size
    assert torch.equal(flipped["image"], whole["image"].flip(-1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=30, patch_size=16), "img_size 30 is not a multiple of patch_size 16"),
    (dict(scale=(0.0, 1.0)), r"scale must be \(low, high\) with 0 < low <= high <= 1, got \(0.0, 1.0\)"),
    (dict(scale=(0.8, 0.2)), r"got \(0.8, 0.2\)"),
    (dict(ratio=(0.0, 1.0)), r"ratio must be \(low, high\) with 0 < low <= high, got \(0.0, 1.0\)"),
    (dict(hflip=2), r"hflip is a probability in \[0, 1\], got 2"),
])
def test_bad_augmentation_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAEAugmentation(**kwargs)
