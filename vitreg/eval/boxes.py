"""Images with ground-truth object boxes, and the box metrics of object discovery (IoU, CorLoc).

Box convention, everywhere in vitreg: ``(x0, y0, x1, y1)`` in pixel-edge coordinates of the full image,
with ``x1``/``y1`` exclusive. A box covers pixel columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``, its
area is ``(x1 - x0) * (y1 - y0)`` and the whole ``W x H`` image is ``(0, 0, W, H)``.

Formats read by ``load_box_dataset``:

- **Pascal VOC**: a folder with ``Annotations/*.xml`` and ``JPEGImages/``; with ``image_set`` the ids come
  from ``ImageSets/Main/<image_set>.txt``, else every XML file is read (sorted). VOC boxes are 1-based
  inclusive pixel indices, so ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``
  (the conversion LOST uses). ``difficult`` / ``truncated`` flags are kept per box.
- **JSON**: ``{"images": [{"file": "a.jpg", "boxes": [[x0, y0, x1, y1], ...]}, ...]}``, files relative to
  the JSON file's folder (absolute paths also work), boxes in our convention.
- **CSV**: a header ``file,x0,y0,x1,y1`` then one row per box (an image with several boxes has several
  rows; images keep the order of their first row), files relative to the CSV's folder.

``no_hard`` follows LOST's ``--no_hard``: boxes flagged difficult or truncated are removed from the ground
truth, and images left with no box are dropped. Images without any box are always dropped, since
CorLoc is only defined on images that contain an object.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Box = tuple[float, float, float, float]

CSV_HEADER = ["file", "x0", "y0", "x1", "y1"]


@dataclass(frozen=True)
class ObjectBox:
    """One ground-truth object: its box (our convention) and VOC's flags."""

    box: Box
    name: str | None = None
    difficult: bool = False
    truncated: bool = False

    @property
    def hard(self) -> bool:
        """LOST's notion of a hard object: difficult or truncated."""
        return self.difficult or self.truncated


@dataclass
class BoxedImage:
    """An image file and its ground-truth objects."""

    path: Path
    objects: list[ObjectBox] = field(default_factory=list)

    @property
    def boxes(self) -> list[Box]:
        return [o.box for o in self.objects]


# ---------------------------------------------------------------- metrics
def _as_box(box: Sequence[float], what: str) -> Box:
    if len(box) != 4:
        raise ValueError(f"{what} must have 4 numbers (x0, y0, x1, y1), got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{what} {list(box)!r} has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1), x1/y1 exclusive")
    return x0, y0, x1, y1


def box_area(box: Sequence[float]) -> float:
    x0, y0, x1, y1 = _as_box(box, "box")
    return (x1 - x0) * (y1 - y0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes ``(x0, y0, x1, y1)``, x1/y1 exclusive; 0 if both are empty."""
    ax0, ay0, ax1, ay1 = _as_box(a, "box a")
    bx0, by0, bx1, by1 = _as_box(b, "box b")
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def best_iou(pred: Sequence[float], gt_boxes: Sequence[Sequence[float]]) -> float:
    """The largest IoU between ``pred`` and any ground-truth box (0 with no boxes)."""
    return max((box_iou(pred, g) for g in gt_boxes), default=0.0)


def corloc(
    pred_boxes: Sequence[Sequence[float]],
    gt_boxes_per_image: Sequence[Sequence[Sequence[float]]],
    threshold: float = 0.5,
) -> float:
    """Correct localisation in percent: an image counts when IoU(pred, any of its GT boxes) >= ``threshold``."""
    if len(pred_boxes) != len(gt_boxes_per_image):
        raise ValueError(
            f"got {len(pred_boxes)} predicted boxes for {len(gt_boxes_per_image)} images; pass one box per image"
        )
    if not pred_boxes:
        raise ValueError("CorLoc of zero images is undefined; pass at least one image")
    hits = sum(best_iou(p, gts) >= threshold for p, gts in zip(pred_boxes, gt_boxes_per_image, strict=True))
    return 100.0 * hits / len(pred_boxes)


# ---------------------------------------------------------------- readers
def _xml_text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(
            f"{xml_path}: <{node.tag}> has no <{tag}>; every VOC <object> needs name and bndbox/xmin..ymax"
        )
    return child.text.strip()


def _xml_number(node: ET.Element, tag: str, xml_path: Path) -> float:
    text = _xml_text(node, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{xml_path}: <{tag}> must be a number, got {text!r}") from None


def _xml_flag(node: ET.Element, tag: str) -> bool:
    child = node.find(tag)
    return child is not None and child.text is not None and child.text.strip() == "1"


def read_voc_annotation(xml_path: Path, image_dir: Path) -> BoxedImage:
    """One VOC XML file -> the image path and its objects, boxes converted to our convention."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{xml_path}: not valid XML ({err}); re-extract the VOC annotations") from err
    filename = root.findtext("filename")
    filename = filename.strip() if filename and filename.strip() else xml_path.stem + ".jpg"
    objects = []
    for obj in root.findall("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{xml_path}: an <object> has no <bndbox>; every VOC object needs one")
        xmin, ymin, xmax, ymax = (_xml_number(bndbox, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = _as_box((xmin - 1, ymin - 1, xmax, ymax), f"{xml_path}: box")
        objects.append(
            ObjectBox(
                box,
                name=obj.findtext("name", default="").strip() or None,
                difficult=_xml_flag(obj, "difficult"),
                truncated=_xml_flag(obj, "truncated"),
            )
        )
    return BoxedImage(image_dir / filename, objects)


def read_voc(root: str | Path, image_set: str | None = None) -> list[BoxedImage]:
    """A Pascal VOC folder (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/Main/<set>.txt``)."""
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise ValueError(f"{root} has no Annotations/ folder; pass the VOC root (e.g. VOCdevkit/VOC2007)")
    if image_set is None:
        xml_files = sorted(ann_dir.glob("*.xml"))
    else:
        list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            raise ValueError(f"{list_file} does not exist; pass an existing image_set (train, val, trainval, test)")
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        xml_files = [ann_dir / f"{i}.xml" for i in ids]
        missing = [p for p in xml_files if not p.is_file()]
        if missing:
            raise ValueError(f"{list_file} lists {len(missing)} id(s) with no annotation, e.g. {missing[0]}")
    if not xml_files:
        raise ValueError(f"{ann_dir} has no .xml files")
    return [read_voc_annotation(p, root / "JPEGImages") for p in xml_files]


def read_json_boxes(path: str | Path) -> list[BoxedImage]:
    """Our JSON format (see the module docstring)."""
    path = Path(path)
    example = '{"images": [{"file": "a.jpg", "boxes": [[x0, y0, x1, y1]]}]}'
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected {example}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list, like {example}")
    images = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "boxes" not in entry:
            raise ValueError(f"{where} must be an object with 'file' (str) and 'boxes' (list of [x0, y0, x1, y1])")
        if not isinstance(entry["boxes"], list):
            raise ValueError(f"{where}.boxes must be a list of [x0, y0, x1, y1]")
        objects = []
        for j, box in enumerate(entry["boxes"]):
            if not isinstance(box, list) or not all(isinstance(v, (int, float)) for v in box):
                raise ValueError(f"{where}.boxes[{j}] must be a list of 4 numbers [x0, y0, x1, y1], got {box!r}")
            objects.append(ObjectBox(_as_box(box, f"{where}.boxes[{j}]")))
        images.append(BoxedImage(path.parent / entry["file"], objects))
    return images


def read_csv_boxes(path: str | Path) -> list[BoxedImage]:
    """Our CSV format: header ``file,x0,y0,x1,y1``, one row per box (see the module docstring)."""
    path = Path(path)
    by_file: dict[str, BoxedImage] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise ValueError(f"{path}: line 1 must be the header {','.join(CSV_HEADER)}, got {header!r}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 5:
                raise ValueError(f"{path}: line {line} has {len(row)} fields, expected 5 ({','.join(CSV_HEADER)})")
            file = row[0].strip()
            if not file:
                raise ValueError(f"{path}: line {line} has an empty file name")
            try:
                coords = [float(c) for c in row[1:]]
            except ValueError as err:
                raise ValueError(f"{path}: line {line}: x0,y0,x1,y1 must be numbers, got {row[1:]}") from err
            box = _as_box(coords, f"{path}: line {line}: box")
            by_file.setdefault(file, BoxedImage(path.parent / file)).objects.append(ObjectBox(box))
    return list(by_file.values())


def load_box_dataset(
    path: str | Path, *, image_set: str | None = None, no_hard: bool = False, limit: int | None = None
) -> list[BoxedImage]:
    """Images and boxes from a VOC folder, a ``.json`` or a ``.csv`` file (format from the path).

    ``no_hard`` drops difficult/truncated boxes and then images without boxes (LOST's ``--no_hard``);
    ``limit`` keeps the first ``limit`` images after that.
    """
    path = Path(path)
    if path.is_dir():
        images = read_voc(path, image_set)
    elif not path.exists():
        raise ValueError(f"{path} does not exist; pass a VOC folder, a .json or a .csv box file")
    elif image_set is not None:
        raise ValueError(f"image_set={image_set!r} only applies to VOC folders, not to {path.name}")
    elif path.suffix.lower() == ".json":
        images = read_json_boxes(path)
    elif path.suffix.lower() == ".csv":
        images = read_csv_boxes(path)
    else:
        raise ValueError(f"{path}: unknown box format; pass a VOC folder (with Annotations/), a .json or a .csv")
    if no_hard:
        images = [BoxedImage(im.path, [o for o in im.objects if not o.hard]) for im in images]
    images = [im for im in images if im.objects]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}")
        images = images[:limit]
    if not images:
        raise ValueError(f"{path}: no image with a ground-truth box" + (" after no_hard" if no_hard else ""))
    return images
