"""Box datasets (VOC, JSON, CSV) and the box metrics, on hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitreg.eval.boxes import box_iou, corloc, load_box_dataset


# ---------------------------------------------------------------- metrics
def test_box_iou_known_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no pixel (x1 exclusive)
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)  # half of each overlaps: 1 / (2 + 2 - 1)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)  # nested
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty boxes


def test_box_iou_rejects_malformed_boxes():
    with pytest.raises(ValueError, match="4 numbers"):
        box_iou((0, 0, 1), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x1 < x0"):
        box_iou((5, 0, 1, 1), (0, 0, 1, 1))


def test_corloc_counts_any_gt_box_at_half_iou():
    gts = [
        [(0, 0, 10, 10)],  # exact hit
        [(50, 50, 60, 60), (0, 0, 10, 20)],  # matches the second box: IoU 0.5 exactly -> counts
        [(1, 0, 3, 1), (100, 100, 110, 110)],  # IoU 1/3 with the first, 0 with the second -> miss
        [(30, 30, 40, 40)],  # disjoint -> miss
    ]
    preds = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 2, 1), (0, 0, 10, 10)]
    assert corloc(preds, gts) == 50.0
    assert corloc(preds, gts, threshold=0.3) == 75.0  # the 1/3 one now counts


def test_corloc_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="one box per image"):
        corloc([(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="at least one image"):
        corloc([], [])


# ---------------------------------------------------------------- VOC
def voc_xml(filename: str, objects: list[dict]) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"]
    for o in objects:
        parts.append(
            f"<object><name>{o['name']}</name><truncated>{o.get('truncated', 0)}</truncated>"
            f"<difficult>{o.get('difficult', 0)}</difficult><bndbox><xmin>{o['box'][0]}</xmin>"
            f"<ymin>{o['box'][1]}</ymin><xmax>{o['box'][2]}</xmax><ymax>{o['box'][3]}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_voc(root: Path) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    anns = {
        "000001": [{"name": "dog", "box": (1, 1, 10, 20)}],
        "000002": [
            {"name": "cat", "box": (5, 6, 7, 8), "difficult": 1},
            {"name": "car", "box": (11, 21, 50, 60), "truncated": 0},
        ],
        "000003": [
            {"name": "cat", "box": (1, 1, 3, 3), "difficult": 1},
            {"name": "cow", "box": (2, 2, 4, 4), "truncated": 1},
        ],
    }
    for stem, objects in anns.items():
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", objects))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000003\n000001\n")
    return root


def test_voc_boxes_are_converted_from_one_based_inclusive(tmp_path):
    images = load_box_dataset(make_voc(tmp_path / "VOC2007"))
    assert [im.path.name for im in images] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert images[0].path == tmp_path / "VOC2007" / "JPEGImages" / "000001.jpg"
    assert images[0].boxes == [(0.0, 0.0, 10.0, 20.0)]  # VOC (1, 1, 10, 20) covers 10 x 20 pixels
    first = images[1].objects[0]
    assert (first.name, first.difficult, first.truncated, first.box) == ("cat", True, False, (4.0, 5.0, 7.0, 8.0))


def test_voc_no_hard_drops_hard_boxes_and_all_hard_images(tmp_path):
    images = load_box_dataset(make_voc(tmp_path / "VOC2007"), no_hard=True)
    assert [im.path.name for im in images] == ["000001.jpg", "000002.jpg"]  # 000003: every object hard
    assert images[1].boxes == [(10.0, 20.0, 50.0, 60.0)]  # the difficult cat is gone, the car kept


def test_voc_image_set_order_and_limit(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    images = load_box_dataset(root, image_set="trainval")
    assert [im.path.name for im in images] == ["000003.jpg", "000001.jpg"]
    assert [im.path.name for im in load_box_dataset(root, image_set="trainval", limit=1)] == ["000003.jpg"]
    with pytest.raises(ValueError, match=r"test\.txt does not exist"):
        load_box_dataset(root, image_set="test")


def test_voc_errors_name_the_file(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    bad = root / "Annotations" / "000009.xml"
    bad.write_text("<annotation><object><name>x</name></object></annotation>")
    with pytest.raises(ValueError, match=r"000009\.xml.*no <bndbox>"):
        load_box_dataset(root)
    bad.write_text("<annotation><object><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox>")
    with pytest.raises(ValueError, match=r"000009\.xml.*not valid XML"):
        load_box_dataset(root)
    bad.write_text(voc_xml("9.jpg", [{"name": "x", "box": ("a", 1, 2, 2)}]))
    with pytest.raises(ValueError, match=r"000009\.xml.*<xmin> must be a number"):
        load_box_dataset(root)


# ---------------------------------------------------------------- JSON / CSV
def test_json_format(tmp_path):
    path = tmp_path / "boxes.json"
    data = {"images": [{"file": "a.png", "boxes": [[1, 2, 3, 4], [0, 0, 5, 5]]}, {"file": "sub/b.png", "boxes": []}]}
    path.write_text(json.dumps(data))
    images = load_box_dataset(path)
    assert len(images) == 1  # b.png has no box: CorLoc is undefined for it
    assert images[0].path == tmp_path / "a.png"
    assert images[0].boxes == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 5.0, 5.0)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"imgs": []}', "'images' list"),
        ('{"images": [{"file": "a.png"}]}', r"images\[0\] must be an object with 'file'"),
        ('{"images": [{"file": "a.png", "boxes": [[1, 2, 3]]}]}', r"images\[0\]\.boxes\[0\] must have 4 numbers"),
        ('{"images": [{"file": "a.png", "boxes": [["1", 2, 3, 4]]}]}', r"boxes\[0\] must be a list of 4 numbers"),
        ('{"images": [{"file": "a.png", "boxes": [[5, 2, 3, 4]]}]}', "x1 < x0"),
    ],
)
def test_json_errors(tmp_path, content, message):
    path = tmp_path / "boxes.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_box_dataset(path)


def test_csv_format_groups_rows_per_file(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("file,x0,y0,x1,y1\nb.png,1,2,3,4\na.png,0,0,8,8\nb.png,5,5,9,9.5\n\n")
    images = load_box_dataset(path)
    assert [im.path.name for im in images] == ["b.png", "a.png"]
    assert images[0].boxes == [(1.0, 2.0, 3.0, 4.0), (5.0, 5.0, 9.0, 9.5)]
    assert images[1].path == tmp_path / "a.png"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.png,1,2,3,4\n", "line 1 must be the header file,x0,y0,x1,y1"),
        ("file,x0,y0,x1,y1\na.png,1,2,3\n", "line 2 has 4 fields"),
        ("file,x0,y0,x1,y1\na.png,1,2,3,4\na.png,1,x,3,4\n", "line 3: x0,y0,x1,y1 must be numbers"),
        ("file,x0,y0,x1,y1\na.png,1,2,0,4\n", "line 2: box .* x1 < x0"),
        ("file,x0,y0,x1,y1\n,1,2,3,4\n", "line 2 has an empty file name"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "boxes.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_box_dataset(path)


def test_format_detection_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_box_dataset(tmp_path / "missing.json")
    (tmp_path / "boxes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown box format"):
        load_box_dataset(tmp_path / "boxes.txt")
    with pytest.raises(ValueError, match="no Annotations/ folder"):
        load_box_dataset(tmp_path)
    (tmp_path / "boxes.csv").write_text("file,x0,y0,x1,y1\na.png,1,2,3,4\n")
    with pytest.raises(ValueError, match="only applies to VOC"):
        load_box_dataset(tmp_path / "boxes.csv", image_set="trainval")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_box_dataset(tmp_path / "boxes.csv", limit=0)
    (tmp_path / "empty.csv").write_text("file,x0,y0,x1,y1\n")
    with pytest.raises(ValueError, match="no image with a ground-truth box"):
        load_box_dataset(tmp_path / "empty.csv")
