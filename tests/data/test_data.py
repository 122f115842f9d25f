"""models/data/datasets.py: COCO-format datasets from the config, their files, their validation
before any work, and degenerate annotations."""
import json
import logging
import os

import numpy as np
import pytest

import models  # noqa: F401  (before detectron2)
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util

from models.config import load_config
from models.data.datasets import (check_dataset_files, check_image_sizes, drop_degenerate_annotations,
                                  register_coco_datasets, validate_coco_json)
from models.engine import loops

TINY = "configs/test/tiny_mimdet.py"

SQUARE = [10, 10, 30, 10, 30, 30, 10, 30]


def _annotation(id, bbox=(10, 10, 20, 20), segmentation=(SQUARE,)):
    return dict(id=id, bbox=list(bbox), bbox_mode=BoxMode.XYWH_ABS, category_id=0,
                segmentation=[list(p) for p in segmentation])


def test_degenerate_boxes_and_polygons_are_dropped_with_one_counting_warning(caplog):
    records = [
        dict(file_name="a.png", annotations=[
            _annotation(1),
            _annotation(2, bbox=(10, 10, 0, 20)),  # no width
            _annotation(3, bbox=(10, float("nan"), 5, 5)),
            _annotation(4, segmentation=([10, 10, 30, 10],)),  # two points
            _annotation(5, segmentation=([10, 10, 20, 20, 30, 30],)),  # collinear: no area
            _annotation(6, segmentation=(SQUARE, [1, 1, 2, 2, 3, 3])),  # one good polygon is enough
        ]),
        dict(file_name="b.png", annotations=[_annotation(7, bbox=(5, 5, -3, 4))]),
        dict(file_name="c.png", annotations=[_annotation(8)]),
    ]
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        kept = drop_degenerate_annotations(records)
    assert [r["file_name"] for r in kept] == ["a.png", "c.png"]
    assert [a["id"] for a in kept[0]["annotations"]] == [1, 6]
    assert kept[0]["annotations"][1]["segmentation"] == [SQUARE]
    assert "Dropped 5 of 8 training annotations with degenerate boxes or polygons" in caplog.text
    assert "a.png, annotation 2: box [10, 10, 0, 20] has no area" in caplog.text
    assert "1 image(s) left without annotations dropped" in caplog.text
    assert records[0]["annotations"][1]["id"] == 2  # the input is not modified


def test_nothing_left_is_a_clear_error_and_clean_data_passes_untouched(caplog):
    with pytest.raises(ValueError, match=r"no training image is left: all 1 annotations are degenerate .*b.png"):
        drop_degenerate_annotations([dict(file_name="b.png", annotations=[_annotation(1, bbox=(0, 0, 0, 0))])])
    clean = [dict(file_name="c.png", annotations=[_annotation(1)]), dict(file_name="d.png")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        assert drop_degenerate_annotations(clean) == clean
    assert caplog.text == ""


def test_missing_dataset_files_are_named(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(FileNotFoundError, match=r"dataset 'nojson': json_file .*absent.json does not exist"):
        register_coco_datasets([dict(name="nojson", json_file=str(tmp_path / "absent.json"), image_root=str(images))])
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"dataset 'noimages': image_root .*nowhere is not a folder"):
        register_coco_datasets([dict(name="noimages", json_file=str(tmp_path / "a.json"),
                                     image_root=str(tmp_path / "nowhere"))])
    with pytest.raises(ValueError, match=r"lacks \['image_root'\]"):
        register_coco_datasets([dict(name="partial", json_file=str(tmp_path / "a.json"))])


def test_builtin_dataset_without_its_files_is_named():
    if os.path.exists(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco")):
        pytest.skip("COCO is present here")
    with pytest.raises(FileNotFoundError, match=r"dataset 'coco_2017_val': annotation file .*instances_val2017.json"
                                                r" does not exist \(builtin datasets live under \$DETECTRON2_DATASETS"):
        check_dataset_files("coco_2017_val")
    with pytest.raises(KeyError, match="dataset 'no_such_set' is not registered"):
        check_dataset_files(["no_such_set"])


def test_the_resumable_train_loader_drops_them(caplog):
    from models.data.resumable import build_resumable_train_loader

    records = [dict(file_name=f"{i}.png", width=32, height=32, image_id=i,
                    annotations=[_annotation(1, bbox=(0, 0, 0, 5) if i == 2 else (1, 1, 5, 5))]) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="models.data.datasets"):
        loader = build_resumable_train_loader(records, mapper=lambda r: r, total_batch_size=3,
                                              aspect_ratio_grouping=False)
    assert "Dropped 1 of 4 training annotations" in caplog.text
    assert sorted(r["image_id"] for r in next(iter(loader))) == [0, 1, 3]


def _broken_copy(json_file, edit):
    data = json.loads(json_file.read_text())
    edit(data)
    broken = json_file.with_name("broken.json")
    broken.write_text(json.dumps(data))
    return broken


def test_every_problem_of_a_json_is_listed_at_once_with_counts(tmp_path, toy_coco_writer):
    json_file = toy_coco_writer(tmp_path)

    def edit(data):
        images, annotations = data["images"], data["annotations"]
        images.append(dict(images[0], file_name="another.png"))  # a second image with id 1
        del images[2]["height"]
        del annotations[0]["bbox"], annotations[1]["category_id"]
        annotations[2]["category_id"] = 5
        annotations[3]["image_id"] = 999
        annotations[4]["id"] = annotations[5]["id"]
        del annotations[6]["area"]
        annotations[7].pop("iscrowd")
        annotations[8]["segmentation"] = [[1, 1, 5, 5]]  # 2 points: pycocotools cannot rasterize it
        annotations[9]["segmentation"] = [[10, 10, float("nan"), 20, 30, 40]]
        annotations[10]["segmentation"] = []
        annotations[11]["area"] = -5
        annotations[12]["bbox"] = [500, 500, 20, 30]  # the images are 128 x 128

    broken = _broken_copy(json_file, edit)
    with pytest.raises(ValueError) as error:
        validate_coco_json("broken", str(broken))
    message = str(error.value)
    assert message.startswith(f"dataset 'broken' ({broken}) has problems that would stop or corrupt the run")
    for line in ["1 x duplicate image ids (one image would take another's annotations) (e.g. image 1)",
                 "1 x images without height (e.g. image 3)",
                 "1 x annotations without a bbox of 4 numbers (e.g. annotation 1: None)",
                 "2 x annotations without a category_id of the categories (e.g. annotation 2: None, annotation 3: 5)",
                 "1 x annotations of an image id not in images (e.g. annotation 4: 999)",
                 "1 x duplicate annotation ids (e.g. annotation 6)",
                 "1 x annotations whose bbox lies outside its image (e.g. annotation 13: [500, 500, 20, 30])"]:
        assert f"  {line}" in message.splitlines()
    assert "area" not in message and "fewer than 3 points" not in message  # a training set needs neither
    with pytest.raises(ValueError) as error:
        validate_coco_json("broken", str(broken), for_evaluation=True)
    lines = str(error.value).splitlines()
    for line in ["2 x annotations without a non-negative area (COCO evaluation reads it) (e.g. annotation 7, "
                 "annotation 12)",
                 "1 x polygons with coordinates that are not finite numbers (e.g. annotation 10: nan)",
                 "1 x annotations without a segmentation (mask evaluation reads it) (e.g. annotation 11: [])",
                 "1 x annotations without iscrowd 0 or 1 (COCO evaluation reads it) (e.g. annotation 8)",
                 "1 x polygons of fewer than 3 points (pycocotools cannot rasterize them) (e.g. annotation 9)"]:
        assert f"  {line}" in lines
    validate_coco_json("toy", str(json_file), for_evaluation=True)  # the clean original passes


def test_duplicate_class_names_and_an_evaluation_set_without_annotations_are_named(tmp_path, toy_coco_writer):
    json_file = toy_coco_writer(tmp_path)
    same_names = _broken_copy(json_file, lambda data: data["categories"][1].update(name="red"))
    with pytest.raises(ValueError, match=r"1 x duplicate category names \(results are reported, and checked, by "
                                         r"name\) \(e.g. red\)"):
        validate_coco_json("same_names", str(same_names))
    empty = _broken_copy(json_file, lambda data: data.update(annotations=[]))
    validate_coco_json("empty", str(empty))  # a training set without annotations fails in detectron2's loader
    with pytest.raises(ValueError, match=r"evaluation sets without annotations"):
        validate_coco_json("empty", str(empty), for_evaluation=True)


def test_a_json_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "annotations.json"
    bad.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(ValueError, match=rf"dataset 'x' \({bad}\) is not valid JSON: Expecting value: line 1"):
        validate_coco_json("x", str(bad))
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"no list of annotations, categories"):
        validate_coco_json("x", str(bad))


def _small_coco(tmp_path, annotations, images=None, categories=None):
    """A json of two images (1: 20 high, 30 wide; 2: 10 x 10) and the given annotations, each
    a box in its image with whatever is given on top (a segmentation, say)."""
    images = images or [dict(id=1, file_name="a.png", height=20, width=30),
                        dict(id=2, file_name="b.png", height=10, width=10)]
    annotations = [dict(dict(id=number, image_id=1, category_id=1, bbox=[2, 2, 5, 5], area=25, iscrowd=0),
                        **annotation) for number, annotation in enumerate(annotations, 1)]
    json_file = tmp_path / "small.json"
    json_file.write_text(json.dumps(dict(images=images, annotations=annotations,
                                         categories=categories or [dict(id=1, name="thing")])))
    return str(json_file)


def _problems(json_file, for_evaluation):
    with pytest.raises(ValueError) as error:
        validate_coco_json("small", json_file, for_evaluation=for_evaluation)
    return str(error.value).splitlines()[1:]


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return dict(size=rle["size"], counts=rle["counts"].decode("ascii"))


def test_rle_masks_of_another_size_than_their_image_or_that_do_not_decode_are_named(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[2:7, 2:7] = 1
    good = [dict(iscrowd=1, segmentation=_rle(mask)),  # compressed
            dict(segmentation=dict(size=[20, 30], counts=[62, 5, 15, 5, 513])),  # uncompressed, 600 pixels
            dict(image_id=2, segmentation=dict(size=[10.0, 10.0], counts=[100]))]
    json_file = _small_coco(tmp_path, good)
    validate_coco_json("small", json_file)
    validate_coco_json("small", json_file, for_evaluation=True)
    swapped = _rle(mask.T)  # [30, 20]: a valid mask, but of a 30 high, 20 wide image
    broken = good + [
        dict(iscrowd=1, segmentation=swapped),
        dict(segmentation=dict(size=[30, 20], counts=[600])),
        dict(image_id=2, segmentation=dict(size=[10, 10], counts="abc")),
        dict(image_id=2, segmentation=dict(size=[10, 10], counts="")),  # pycocotools returns garbage for it
        dict(image_id=2, segmentation=dict(size=[10, 10], counts=_rle(mask)["counts"])),  # 600 pixels, not 100
        dict(image_id=2, segmentation=dict(size=[10, 10], counts=[5, 90])),
        dict(image_id=2, segmentation=dict(size=[10, 10], counts=[-5, 105])),
        dict(image_id=2, segmentation=dict(size=[10, 10], counts=[50, "50"])),
        dict(image_id=2, segmentation=dict(size=[10], counts=[100])),
        dict(image_id=2, segmentation=dict(size=[10, 10], counts=None)),
        dict(image_id=2, segmentation=dict(counts=[100])),
    ]
    for for_evaluation in (False, True):
        problems = _problems(_small_coco(tmp_path, broken), for_evaluation)
        assert problems == [
            "  2 x RLE segmentations whose size is not [height, width] of their image (pycocotools would score "
            "them IoU -1) (e.g. annotation 4: size [30, 20], image [20, 30], annotation 5: size [30, 20], "
            "image [20, 30])",
            "  3 x compressed RLEs whose counts do not decode to a mask of their size (e.g. annotation 6: 'abc' "
            "for size [10, 10], annotation 7: '' for size [10, 10], annotation 8: "
            f"{_rle(mask)['counts']!r} for size [10, 10])",
            "  3 x uncompressed RLEs whose counts are not non-negative whole numbers adding up to height x width "
            "(e.g. annotation 9: [5, 90] for size [10, 10], annotation 10: [-5, 105] for size [10, 10], "
            "annotation 11: [50, '50'] for size [10, 10])",
            "  1 x RLE segmentations whose size is not [height, width] of 2 whole numbers from 1 to 100000 "
            "(e.g. annotation 12: [10])",
            "  1 x RLE segmentations whose counts are neither a list of run lengths nor a compressed string "
            "(e.g. annotation 13: None)",
            "  1 x RLE segmentations without counts and size (e.g. annotation 14)",
        ]


def test_malformed_polygons_are_named_in_training_and_evaluation_sets(tmp_path):
    json_file = _small_coco(tmp_path, [
        dict(segmentation=[2, 2, 7, 2, 7, 7, 2, 7]),  # one polygon without the list of polygons around it
        dict(segmentation=[[2, 2, "a", 2, 7, 7]]),
        dict(segmentation=[[2, 2, 7, 2, 7, 7, 2]]),  # no last y
        dict(segmentation=[[2, 2, 7, 2, 7, 7, 2, 7], [1, 1, 2, 2]]),  # a training set drops the 2-point one
        dict(segmentation="2 2 7 2 7 7"),
    ])
    for for_evaluation in (False, True):
        problems = _problems(json_file, for_evaluation)
        assert problems == [
            "  2 x segmentations that are not a list of polygons (lists of x, y numbers) or an RLE "
            "(e.g. annotation 1: [2, 2, 7, 2, 7, 7, 2, 7], annotation 5: '2 2 7 2 7 7')",
            "  1 x polygons with coordinates that are not finite numbers (e.g. annotation 2: 'a')",
            "  1 x polygons of an odd number of coordinates (each point is an x, y pair) "
            "(e.g. annotation 3: 7 coordinates)",
        ] + (["  1 x polygons of fewer than 3 points (pycocotools cannot rasterize them) (e.g. annotation 4)"]
             if for_evaluation else [])


def test_category_ids_that_are_not_integers_are_named(tmp_path):
    categories = [dict(id="1", name="thing"), dict(id=2, name="other"), dict(id=3.5, name="half")]
    json_file = _small_coco(tmp_path, [dict(category_id="1"), dict(category_id=2)], categories=categories)
    # detectron2's loader stops on these with "TypeError: '<' not supported"
    assert _problems(json_file, False) == [
        "  2 x categories whose id is not an integer (e.g. 'thing': '1', 'half': 3.5)"]


def test_image_sides_must_be_positive_integers(tmp_path):
    """A float side (221.0) would pass here and fail in detectron2's mask pasting at the end of a run."""
    images = [dict(id=number, file_name=f"{number}.png", height=height, width=30)
              for number, height in enumerate([20.0, 20.5, 0, -20, True, "20", None, 10**400, 100_001], 1)]
    assert _problems(_small_coco(tmp_path, [], images=images), False) == [
        "  9 x images whose height is not an integer from 1 to 100000 (e.g. image 1: 20.0, image 2: 20.5, "
        "image 3: 0)"]


def test_ids_and_names_that_are_not_keys_are_named_not_a_traceback(tmp_path):
    """A list where an id belongs cannot key detectron2's dicts; a file_name of null or a class
    name of 5 would stop the run later, in the loader or the evaluator."""
    images = [dict(id=1, file_name="a.png", height=20, width=30), dict(id=[2], file_name="b.png", height=10, width=10),
              dict(id=3, file_name=None, height=10, width=10), dict(id=4, file_name="", height=10, width=10)]
    categories = [dict(id=1, name="thing"), dict(id=2, name=5), dict(id=[3], name=["x"])]
    json_file = _small_coco(tmp_path, [dict(id=[7]), dict(image_id=[1]), dict(category_id=[1]),
                                       dict(bbox=[0, 0, 10**400, 5])], images=images, categories=categories)
    assert _problems(json_file, False) == [
        "  2 x categories whose name is not a non-empty string (e.g. 5, ['x'])",
        "  1 x categories whose id is not an integer (e.g. ['x']: [3])",
        "  1 x images whose id is not an integer or a string (e.g. #1: [2])",
        "  2 x images whose file_name is not a non-empty string (e.g. image 3: None, image 4: '')",
        "  1 x annotations whose id is not an integer or a string (e.g. annotation [7])",
        "  1 x annotations of an image id not in images (e.g. annotation 2: [1])",
        "  1 x annotations without a category_id of the categories (e.g. annotation 3: [1])",
        f"  1 x annotations without a bbox of 4 numbers (e.g. annotation 4: [0, 0, 1{'0' * 49}...)",
    ]


def test_mixed_id_types_no_categories_and_deep_nesting_are_named(tmp_path):
    images = [dict(id=1, file_name="a.png", height=20, width=30),
              dict(id="two", file_name="b.png", height=10, width=10)]
    json_file = _small_coco(tmp_path, [], images=images)
    assert _problems(json_file, False) == [
        "  1 x image ids that mix integers and strings (detectron2 sorts them) (e.g. image 'two')"]
    no_categories = tmp_path / "no_categories.json"
    no_categories.write_text(json.dumps(dict(images=images[:1], annotations=[], categories=[])))
    assert _problems(str(no_categories), False) == [
        "  1 x datasets without categories (the classes to detect) (e.g. categories: [])"]
    deep = tmp_path / "deep.json"
    deep.write_text('{"images": [], "annotations": [], "categories": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"is not valid JSON that Python reads: its lists or objects nest too deeply"):
        validate_coco_json("deep", str(deep))


def test_polygon_points_far_outside_their_image_are_named(tmp_path):
    """pycocotools rasterizes polygons in 32-bit integers: a coordinate of 1e8 or more makes it
    allocate without bound or crash; points within one image side around the image pass."""
    near = [-30, -20, 60, -20, 60, 40, -30, 40]  # image 1 is 20 x 30: one side (30) outside on every edge
    json_file = _small_coco(tmp_path, [dict(segmentation=[near]), dict(segmentation=[[2, 2, 7, 2, 1e308, 7]]),
                                       dict(segmentation=[[2, 2, 7, 2, 7, 3e8]]),
                                       dict(segmentation=[[-31, 2, 7, 2, 7, 7]]),
                                       dict(segmentation=[[2, 2, 7, 2, 7, 10**400]])])
    for for_evaluation in (False, True):
        assert _problems(json_file, for_evaluation) == [
            "  3 x polygons with a point more than one image side outside the image (e.g. annotation 2: 1e+308 "
            "in an image of 20x30, annotation 3: 300000000.0 in an image of 20x30, annotation 4: -31 in an image "
            "of 20x30)",
            f"  1 x polygons with coordinates that are not finite numbers (e.g. annotation 5: 1{'0' * 56}...)",
        ]


def test_the_launcher_validates_before_training(tmp_path, toy_coco_writer, dataset_overrides):
    json_file = toy_coco_writer(tmp_path)
    broken = _broken_copy(json_file, lambda data: data["images"][1].update(id=data["images"][0]["id"]))
    cfg = load_config(TINY, dataset_overrides("dup_ids", broken, tmp_path / "images"))
    with pytest.raises(ValueError, match=r"1 x duplicate image ids"):
        loops.prepare(cfg)


def test_test_images_of_another_size_than_annotated_are_named(coco_quirks):
    json_file, image_root = coco_quirks
    records = load_coco_json(str(json_file), str(image_root))
    check_image_sizes("quirks", records)  # an EXIF-rotated JPEG counts at its displayed size
    rotated = next(r for r in records if r["file_name"].endswith("exif_rotated.jpg"))
    rotated["height"], rotated["width"] = rotated["width"], rotated["height"]  # the stored, unrotated size
    with pytest.raises(ValueError, match=r"1 x images of another size than the json says \(e.g. exif_rotated.jpg: "):
        check_image_sizes("quirks", records)


def _damaged_copy(image_root, tmp_path, damage):
    """A copy of the quirks images in which ``damage(folder)`` spoils some files."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_root, folder)
    damage(folder)
    return folder


def test_unreadable_test_images_are_all_named_with_their_dataset(coco_quirks, tmp_path):
    json_file, image_root = coco_quirks
    names = sorted(os.listdir(image_root))

    def damage(folder):
        (folder / names[0]).write_bytes((folder / names[0]).read_bytes()[:40])  # cut inside its header
        (folder / names[1]).write_text("not an image")
        for name in names[2:5]:
            (folder / name).write_bytes(b"")
        (folder / names[5]).unlink()
        (folder / names[6]).unlink()
        (folder / names[6]).mkdir()

    folder = _damaged_copy(image_root, tmp_path, damage)
    records = load_coco_json(str(json_file), str(folder))
    with pytest.raises(ValueError, match=rf"dataset 'quirks': evaluation needs every one of its {len(records)} "
                                         r"images, readable and at its annotated size:") as error:
        check_image_sizes("quirks", records)
    report = str(error.value)
    assert "5 x images that cannot be read" in report  # every one named, in one message
    assert all(f"{name}: " in report for name in names[:5])
    assert f"1 x images that do not exist (e.g. {folder / names[5]})" in report
    assert f"1 x image paths that are not files (a folder, say) (e.g. {folder / names[6]})" in report


def test_the_test_mapper_names_an_image_it_cannot_decode(coco_quirks, tmp_path):
    """A JPEG cut after its header passes the header check; the test loader's mapper then names it."""
    from detectron2.config import instantiate

    json_file, image_root = coco_quirks
    jpeg = sorted(name for name in os.listdir(image_root) if name.endswith(".jpg"))[0]

    def damage(folder):
        data = (folder / jpeg).read_bytes()
        (folder / jpeg).write_bytes(data[: len(data) // 2])

    folder = _damaged_copy(image_root, tmp_path, damage)
    records = load_coco_json(str(json_file), str(folder))
    check_image_sizes("quirks", records)  # headers only: the cut is past them
    mapper = instantiate(load_config(TINY).dataloader.test.mapper)
    record = next(r for r in records if r["file_name"].endswith(jpeg))
    with pytest.raises(OSError, match=rf"cannot read image .*{jpeg}: "):
        mapper(dict(record))
    assert mapper(dict(next(r for r in records if r is not record)))["image"].ndim == 3  # others map
