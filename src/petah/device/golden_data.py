"""The dense dataset layouts read without torch: folder walking, class lists, masks, COCO JSON and
anomaly folders as numpy arrays. The device's golden-set gate reads its sets with these, and
``petah.data`` (build side) wraps the same arrays as tensors, so both sides read a set alike.

- **Masks** (``images/`` + ``masks/`` + ``classes.txt``): images (3, H, W) uint8, masks (H, W)
  uint8 class indices, 255 = ignore (``petah.data.segmentation`` documents the layout).
- **COCO** (``annotations.json``): per image its (K, 4) float32 xyxy pixel boxes, clamped to the
  image, and (K,) int64 class indices (``petah.data.detection``).
- **Anomaly** (``good/`` + ``<defect>/`` folders, masks under ``ground_truth/``): per image its
  defect type ("good" for good ones) and its (H, W) uint8 defect mask where known
  (``petah.data.anomaly``).

A bad sample is an error naming the file with ``strict``; otherwise it is left out and its
message kept in ``skipped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.imaging import DEFAULT_INTENSITY, IMAGE_SUFFIXES, load_image

IGNORE = 255  # the mask value no class has
BOX_TOLERANCE = 1.0  # px a box may poke out of its image (rounding in exporters)
GOOD = "good"
CLASS_FILES = ("classes.txt", "classes.json")


# --- masks ---------------------------------------------------------------------------------------

@dataclass
class MaskFolder:
    images: list[np.ndarray]  # (3, H, W) uint8
    masks: list[np.ndarray]  # (H, W) uint8 class indices, IGNORE = ignore
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def read_classes(root: Path) -> list[str]:
    """The class names of a mask folder: ``classes.txt`` (one per line) or ``classes.json`` (a list)."""
    for name in CLASS_FILES:
        path = root / name
        if path.is_file():
            try:
                text = path.read_text()
                classes = (json.loads(text) if name.endswith(".json")
                           else [line.strip() for line in text.splitlines() if line.strip()])
            except (OSError, ValueError) as exc:
                raise PetahError(f"{path}: cannot read the class names ({exc})") from exc
            if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
                raise PetahError(f"{path}: needs at least two class names")
            if len(classes) >= IGNORE:
                raise PetahError(f"{path}: at most {IGNORE} classes (mask value {IGNORE} means ignore)")
            return classes
    raise PetahError(f"{root} has no classes.txt (one class name per line) or classes.json")


def read_mask(path: Path) -> np.ndarray:
    """A single-channel PNG of class indices (palette, grey, 16-bit; a boolean one reads 0 / 1) as int64."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            if handle.mode == "1":  # a saved boolean array: 0 / 1
                handle = handle.convert("L").point(lambda v: 1 if v else 0)
            if handle.mode not in ("P", "L", "I", "I;16"):
                raise PetahError(f"{path}: a mask must be a single-channel PNG of class indices, got mode "
                                 f"{handle.mode}")
            array = np.array(handle)
    except (OSError, UnidentifiedImageError) as exc:
        raise PetahError(f"{path}: unreadable mask ({exc})") from exc
    return array.astype(np.int64)


def check_mask_size(mask: np.ndarray, image: np.ndarray, mask_path: Path) -> None:
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise PetahError(f"{mask_path}: mask is {tuple(mask.shape)[::-1]} px but its image is "
                         f"{tuple(image.shape[-2:])[::-1]} px")


def check_mask(image: np.ndarray, mask: np.ndarray, classes: int, mask_path: Path) -> np.ndarray:
    """The mask as uint8 when it fits its image and holds only class indices or ``IGNORE``."""
    check_mask_size(mask, image, mask_path)
    bad = (mask >= classes) & (mask != IGNORE) | (mask < 0)
    if bad.any():
        raise PetahError(f"{mask_path}: mask value {int(mask[bad][0])} is not a class index (0..{classes - 1}) or "
                         f"{IGNORE}")
    return mask.astype(np.uint8)


def read_mask_folder(root: str | Path, classes: list[str] | None = None, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> MaskFolder:
    """``root/images/<stem>.*`` with ``root/masks/<stem>.png`` (sorted by file name); ``classes``
    (default: the folder's class list) bounds the mask values."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise PetahError(f"{root} needs images/ and masks/ folders (a segmentation dataset)")
    classes = classes or read_classes(root)
    files = sorted(p for p in (root / "images").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PetahError(f"{root / 'images'} holds no images")
    images, masks, skipped = [], [], []
    for file in files:
        mask_path = root / "masks" / f"{file.stem}.png"
        try:
            if not mask_path.is_file():
                raise PetahError(f"{file}: no mask {mask_path}")
            image = load_image(file, intensity)
            mask = check_mask(image, read_mask(mask_path), len(classes), mask_path)
        except PetahError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            continue
        images.append(image)
        masks.append(mask)
    if not images:
        raise PetahError(f"{root}: no usable samples ({len(skipped)} skipped; first: {skipped[0]})")
    return MaskFolder(images, masks, list(classes), skipped)


def is_mask_folder(root: Path) -> bool:
    """images/ + masks/ + a class list (a classification set may well have a class called "masks")."""
    def layout(folder: Path) -> bool:
        return (folder / "images").is_dir() and (folder / "masks").is_dir()

    def listed(folder: Path) -> bool:
        return any((folder / n).is_file() for n in CLASS_FILES)

    return (layout(root) and listed(root)) or (layout(root / "train") and (listed(root) or listed(root / "train")))


# --- COCO ----------------------------------------------------------------------------------------

@dataclass
class CocoSet:
    images: list[np.ndarray]  # (3, H, W) uint8
    boxes: list[np.ndarray]  # (K, 4) float32 xyxy pixels, clamped to the image
    labels: list[np.ndarray]  # (K,) int64 class indices
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PetahError(f"{path}: not a readable COCO JSON file ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise PetahError(f"{path}: COCO JSON needs lists 'images', 'annotations' and 'categories' (missing: "
                         f"{', '.join(missing)})")
    return data


def _numbers(*values: float) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _image_path(json_path: Path, file_name: str) -> Path:
    for root in (json_path.parent, json_path.parent / "images"):
        if (root / file_name).is_file():
            return root / file_name
    return json_path.parent / file_name


def read_coco(json_path: str | Path, classes: list[str] | None = None, strict: bool = False,
              intensity: str = DEFAULT_INTENSITY) -> CocoSet:
    """A COCO JSON and its images; category ids map to class indices in id order and must name
    ``classes`` when given."""
    json_path = Path(json_path)
    data = _read_json(json_path)
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        index = {int(c["id"]): i for i, c in enumerate(categories)}
        names = [str(c["name"]) for c in categories]
        entries = {int(img["id"]): {**img, "width": float(img["width"]), "height": float(img["height"])}
                   for img in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise PetahError(f"{json_path}: malformed 'categories' or 'images' entry (each needs id, name / file_name, "
                         f"width, height): {exc!r}") from exc
    if classes is not None and names != classes:
        raise PetahError(f"{json_path}: categories {names[:4]}… differ from the training set's {classes[:4]}…")
    if not names:
        raise PetahError(f"{json_path}: no categories")
    per_image: dict = {i: [] for i in entries}
    problems: dict = {}  # image id (or None) -> first problem
    for n, ann in enumerate(data["annotations"]):
        try:
            image_id, category = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.setdefault(None, f"{json_path}: annotation #{n} is malformed ({exc!r})")
            continue
        if image_id not in entries:
            problems.setdefault(None, f"{json_path}: annotation #{n} names unknown image id {image_id}")
            continue
        entry = entries[image_id]
        where = f"{json_path}: annotation #{n} of {entry.get('file_name')}"
        if category not in index:
            problems.setdefault(image_id, f"{where}: unknown category id {category}")
        elif w <= 0 or h <= 0:
            problems.setdefault(image_id, f"{where}: box {_numbers(x, y, w, h)} has no area")
        elif (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE
              or x + w > entry["width"] + BOX_TOLERANCE or y + h > entry["height"] + BOX_TOLERANCE):
            problems.setdefault(image_id, f"{where}: box {_numbers(x, y, w, h)} lies outside the "
                                          f"{entry['width']:g}x{entry['height']:g} image")
        else:
            per_image[image_id].append(([x, y, x + w, y + h], index[category]))
    if strict and problems:
        raise PetahError(next(iter(problems.values())))
    skipped = [problems[None]] if None in problems else []
    images, boxes, labels = [], [], []
    for image_id, entry in entries.items():
        if image_id in problems:
            skipped.append(problems[image_id])
            continue
        path = _image_path(json_path, str(entry.get("file_name")))
        try:
            if not path.is_file():
                raise PetahError(f"{json_path}: image file {path} is missing")
            image = load_image(path, intensity)
        except PetahError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            continue
        found = per_image[image_id]
        box = np.asarray([b for b, _ in found], dtype=np.float32).reshape(-1, 4)
        box[:, 0::2] = box[:, 0::2].clip(0, image.shape[-1])
        box[:, 1::2] = box[:, 1::2].clip(0, image.shape[-2])
        images.append(image)
        boxes.append(box)
        labels.append(np.asarray([c for _, c in found], dtype=np.int64))
    if not images:
        raise PetahError(f"{json_path}: no usable images ({len(skipped)} skipped; first: "
                         f"{skipped[0] if skipped else '-'})")
    return CocoSet(images, boxes, labels, names, skipped)


def coco_json(folder: Path) -> Path | None:
    for candidate in (folder / "annotations.json", folder / "instances.json"):
        if candidate.is_file():
            return candidate
    return None


def is_coco_folder(root: Path) -> bool:
    return root.suffix == ".json" or coco_json(root) is not None or coco_json(root / "train") is not None


# --- anomaly -------------------------------------------------------------------------------------

@dataclass
class AnomalyFolder:
    images: list[np.ndarray]  # (3, H, W) uint8
    defects: list[str]  # GOOD or the defect type (its folder's name)
    masks: list[np.ndarray | None]  # (H, W) uint8, 1 = defect; a good image's all zeros; None where unknown


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_defect_mask(path: Path, image: np.ndarray) -> np.ndarray:
    mask = read_mask(path)
    check_mask_size(mask, image, path)
    return (mask > 0).astype(np.uint8)


def read_anomaly_part(folders: list[Path], ground_truth: Path | None, intensity: str) -> AnomalyFolder:
    """Images of ``folders`` (a folder named ``good``: good; any other: its defect type), masks from
    ``ground_truth/<defect>/<stem>_mask.png`` where present."""
    images, defects, masks = [], [], []
    for folder in folders:
        defect = folder.name
        for file in images_in(folder):
            image = load_image(file, intensity)
            mask = None
            if defect == GOOD:
                mask = np.zeros(image.shape[-2:], dtype=np.uint8)
            elif ground_truth is not None and (ground_truth / defect / f"{file.stem}_mask.png").is_file():
                mask = read_defect_mask(ground_truth / defect / f"{file.stem}_mask.png", image)
            images.append(image)
            defects.append(defect)
            masks.append(mask)
        if ground_truth is not None and (ground_truth / defect).is_dir():
            stems = {f.stem for f in images_in(folder)}
            orphans = [m.name for m in images_in(ground_truth / defect) if m.stem.removesuffix("_mask") not in stems]
            if orphans:
                raise PetahError(f"{ground_truth / defect / orphans[0]}: a mask without an image in {folder}")
    return AnomalyFolder(images, defects, masks)


def read_anomaly_folder(root: str | Path, intensity: str = DEFAULT_INTENSITY, truth: Path | None = None
                        ) -> AnomalyFolder:
    """One held-out folder (a validation part, a device's golden set): ``good/`` and ``<defect>/``
    folders, masks from ``truth/<defect>/<stem>_mask.png`` (default: ``ground_truth/`` inside it)."""
    root = Path(root)
    folders = [f for f in subfolders(root) if f.name != "ground_truth"]
    if not any(f.name == GOOD for f in folders):
        raise PetahError(f"{root}: needs a good/ folder (good images to set and check the threshold on)")
    truth = truth if truth is not None else root / "ground_truth"
    return read_anomaly_part(folders, truth if truth.is_dir() else None, intensity)


def is_anomaly_folder(root: Path) -> bool:
    """MVTec AD's layout: ``train/good/`` and nothing else under ``train/``, and a ``test/`` folder."""
    train = root / "train"
    return (train.is_dir() and (root / "test").is_dir() and (train / GOOD).is_dir()
            and [p.name for p in subfolders(train)] == [GOOD])


__all__ = ["BOX_TOLERANCE", "CLASS_FILES", "GOOD", "IGNORE", "AnomalyFolder", "CocoSet", "MaskFolder", "check_mask",
           "check_mask_size", "coco_json", "images_in", "is_anomaly_folder", "is_coco_folder", "is_mask_folder",
           "read_anomaly_folder", "read_anomaly_part", "read_classes", "read_coco", "read_defect_mask", "read_mask",
           "read_mask_folder", "subfolders"]
