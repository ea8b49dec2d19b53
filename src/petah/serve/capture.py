"""Capture for re-adaptation: the images that matter, kept with the station's answers, within a hard
size limit; an operator confirms or corrects them on the page; ``petah capture export`` writes them
in the layouts ``petah adapt`` reads.

``DIR/images/<id>.<ext>`` holds each kept upload as it arrived (and ``<id>.<task>.mask.png`` a
segmentation task's answer); ``DIR/index.jsonl`` one line per capture and one per correction,
appended and synced (a torn last line, as a crash leaves it, is skipped on reading and the next
line starts after it; nothing already captured is rewritten). An image is written before its index
line: files of petah's own naming in ``images/`` that no line names (a crash came between) are
removed when the station opens the folder (one station per folder), so crashes cannot fill the
disk past the limit. Strategies, named after what they keep:

* ``low-confidence``: an answer less confident than its task's reference says a right answer is
  (the ATC threshold of a classification task; else the lowest tenth of its validation confidences);
* ``drifting``: a share (``DRIFT_SHARE``) of the images a drifting task answers;
* ``disagreeing``: tasks with the same labels answering differently;
* ``random``: a small random sample (``--capture-random``), the baseline a dataset needs.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.files import AppendLog, atomic_write_bytes, fsync_folder, inside
from petah.options import option
from petah.packages.reference import FIELD, Reference

STRATEGIES = ("low-confidence", "drifting", "disagreeing", "random")
DRIFT_SHARE = 0.2
INDEX = "index.jsonl"
CAPTURE_ID = re.compile(r"[0-9]{19}-[0-9a-f]{6}")
# what keep() writes in images/: the upload, a task's mask, and atomic_write_bytes' temp files of both
OWN_FILE = re.compile(r"\.?(?P<id>[0-9]{19}-[0-9a-f]{6})(\.[a-z]{3,4}|\.[A-Za-z0-9._-]{1,64}\.mask\.png)"
                      r"(\.[A-Za-z0-9_]{8}\.tmp)?")
SUFFIXES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif",
            b"RIFF": ".webp"}


@dataclass
class CaptureConfig:
    capture_dir: str | None = option(None, cli="--capture-dir",
                                     help="Keep the images that matter with the station's answers here, for "
                                          "review on the page and `petah capture export` (off without it).")
    capture_max_mb: float = option(1024.0, cli="--capture-max-mb",
                                   help="Hard limit on the captured images' bytes; past it new captures are "
                                        "dropped (and counted), nothing kept is removed.")
    capture: str = option(",".join(STRATEGIES), cli="--capture",
                          help=f"Which images to keep, comma-separated: {', '.join(STRATEGIES)}.")
    capture_random: float = option(0.01, cli="--capture-random",
                                   help="Share of all answered images the random strategy keeps.")

    def __post_init__(self):
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise PetahError(f"--capture {self.capture!r}: strategies are {', '.join(STRATEGIES)}")
        if not 0 < self.capture_max_mb <= 2**30:
            raise PetahError(f"--capture-max-mb must be a positive number of MB, got {self.capture_max_mb}")
        if not 0 <= self.capture_random <= 1:
            raise PetahError(f"--capture-random must be a share in [0, 1], got {self.capture_random}")

    @property
    def strategies(self) -> list[str]:
        return [s.strip() for s in self.capture.split(",") if s.strip()]


def _confidence_floor(manifest) -> float | None:
    """Below this an answer counts as low-confidence (None: no reference to say)."""
    data = manifest.extra.get(FIELD)
    if data is None:
        return 0.5 if manifest.task.kind == "classification" else None
    try:
        reference = Reference(data)
    except PetahError:
        return None
    if reference.estimator == "atc":
        return reference.threshold
    cumulative = np.cumsum(reference.histogram)
    low, high = reference.confidence_range
    bin_index = int(np.searchsorted(cumulative, 0.1))
    return float(low + (high - low) * (bin_index + 1) / len(reference.histogram))


def _answer_confidence(row: dict) -> float | None:
    if "boxes" in row:
        return max((box["score"] for box in row["boxes"]), default=0.0)
    value = row.get("confidence", row.get("score"))
    return float(value) if isinstance(value, int | float) else None


class CaptureStore:
    """One capture folder (thread-safe: requests append from the server's threads)."""

    def __init__(self, root: str | Path, config: CaptureConfig, seed: int | None = None, sweep: bool = True):
        """``sweep``: remove what a crash left (the station, at start); a reader beside a running
        station (``export_captures``) must not, or it would take an image about to be indexed."""
        self.root, self.config = Path(root), config
        self.images = self.root / "images"
        self.index = self.root / INDEX
        self.max_bytes = int(config.capture_max_mb * 2**20)
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PetahError(f"--capture-dir {root}: cannot create it ({exc.strerror or exc})") from None
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.entries, self.corrections, self.skipped_lines = self._read()
        self.swept = self._sweep() if sweep else 0
        self._log = AppendLog(self.index)
        index_bytes = self.index.stat().st_size if self.index.is_file() else 0
        self.used = sum(int(e.get("bytes", 0)) for e in self.entries.values()) + index_bytes
        self.dropped = 0  # past the size limit, or the disk refused
        self.errors = 0

    def _read(self) -> tuple[dict, dict, int]:
        entries, corrections, skipped = {}, {}, 0
        if not self.index.is_file():
            return entries, corrections, skipped
        with self.index.open("rb") as handle:
            for line in handle:
                try:
                    item = json.loads(line)
                except (ValueError, RecursionError):  # a torn last line, or damage: the rest is kept
                    skipped += 1
                    continue
                if not isinstance(item, dict) or not CAPTURE_ID.fullmatch(str(item.get("id", ""))):
                    skipped += 1
                elif "tasks" in item:
                    # the index names its image: only ``<id><suffix>``, never a path elsewhere
                    if item.get("file") not in {item["id"] + s for s in (*SUFFIXES.values(), ".img")} or not (
                            isinstance(item["tasks"], dict) and isinstance(item.get("bytes", 0), int)):
                        skipped += 1
                        continue
                    entries[item["id"]] = item
                elif isinstance(item.get("task"), str):
                    corrections.setdefault(item["id"], {})[item["task"]] = item
                else:
                    skipped += 1
        return entries, corrections, skipped

    def _sweep(self) -> int:
        """Remove the files a crash left between an image's write and its index line: only names of
        petah's own making whose capture the index does not hold. A folder the process may not
        write in keeps them (they only cost disk)."""
        swept = 0
        for path in self.images.iterdir():
            match = OWN_FILE.fullmatch(path.name)
            if match and match.group("id") not in self.entries and path.is_file() and not path.is_symlink():
                try:
                    path.unlink()
                    swept += 1
                except OSError:
                    pass
        return swept

    @staticmethod
    def _line(item: dict) -> bytes:
        return json.dumps(item, separators=(",", ":")).encode() + b"\n"

    # --- keeping --------------------------------------------------------------------------------
    def reasons(self, rows: dict[str, dict], manifests: dict, drifting: set[str]) -> list[str]:
        """Why this image's answers are worth keeping (empty: they are not)."""
        chosen, why = self.config.strategies, []
        if "low-confidence" in chosen:
            for task, row in rows.items():
                floor, value = _confidence_floor(manifests[task]), _answer_confidence(row)
                if floor is not None and value is not None and value < floor:
                    why.append(f"low-confidence:{task}")
        if "drifting" in chosen and drifting & set(rows) and self._random.random() < DRIFT_SHARE:
            why.append("drifting:" + ",".join(sorted(drifting & set(rows))))
        if "disagreeing" in chosen:
            by_labels: dict[tuple, dict[str, str]] = {}
            for task, row in rows.items():
                if "label" in row:
                    by_labels.setdefault(tuple(manifests[task].labels), {})[task] = row["label"]
            for answers in by_labels.values():
                if len(set(answers.values())) > 1:
                    why.append("disagreeing:" + ",".join(sorted(answers)))
        if "random" in chosen and self._random.random() < self.config.capture_random:
            why.append("random")
        return why

    def keep(self, source: str, data: bytes, rows: dict[str, dict], manifests: dict, drifting: set[str],
             why: list[str] | None = None) -> str | None:
        """Keep one answered image when a strategy wants it and the limit allows; its id, or None.
        ``why``: the reasons, when the caller asked ``reasons`` already (a frame is encoded only then)."""
        why = self.reasons(rows, manifests, drifting) if why is None else why
        if not why:
            return None
        masks = {task: base64.b64decode(row["mask_png"]) for task, row in rows.items() if "mask_png" in row}
        files = len(data) + sum(len(m) for m in masks.values())
        capture_id = f"{time.time_ns():019d}-{self._random.getrandbits(24):06x}"
        suffix = next((s for magic, s in SUFFIXES.items() if data.startswith(magic)), ".img")
        entry = {"id": capture_id, "time": round(time.time(), 3), "file": capture_id + suffix, "bytes": files,
                 "source": str(source)[:200], "reasons": why,
                 "tasks": {task: {"kind": manifests[task].task.kind, "version": row.get("version"),
                                  "labels": list(manifests[task].labels), **_answer(row)}
                           for task, row in rows.items()}}
        line = self._line(entry)
        size = files + len(line)  # its index line counts against the limit too
        with self._lock:
            if self.used + size > self.max_bytes:
                self.dropped += 1
                return None
            self.used += size  # reserved: a concurrent capture sees it
        try:
            atomic_write_bytes(self.images / entry["file"], data)
            for task, mask in masks.items():
                atomic_write_bytes(self.images / f"{capture_id}.{task}.mask.png", mask)
            with self._lock:
                self.used += self._log.append(line) - len(line)  # a newline after a torn line
                self.entries[capture_id] = entry
        except OSError:  # a full disk or a removed folder: the station goes on serving
            with self._lock:
                self.used -= size
                self.errors += 1
            for name in (entry["file"], *(f"{capture_id}.{t}.mask.png" for t in masks)):
                (self.images / name).unlink(missing_ok=True)
            return None
        return capture_id

    # --- reviewing ------------------------------------------------------------------------------
    def listing(self, limit: int = 50, offset: int = 0) -> dict:
        with self._lock:
            ids = sorted(self.entries, reverse=True)
            page = [self._view(i) for i in ids[offset:offset + limit]]
            return {"captures": page, "total": len(ids), "bytes": self.used, "max_bytes": self.max_bytes,
                    "dropped": self.dropped, "errors": self.errors, "skipped_lines": self.skipped_lines}

    def _view(self, capture_id: str) -> dict:
        entry = self.entries[capture_id]
        corrections = self.corrections.get(capture_id, {})
        return {**{k: entry[k] for k in ("id", "time", "reasons", "source")},
                "tasks": {task: {**answer, "review": _review(corrections.get(task))}
                          for task, answer in entry["tasks"].items()}}

    def image_path(self, capture_id: str) -> Path:
        entry = self.entries.get(capture_id) if CAPTURE_ID.fullmatch(capture_id or "") else None
        if entry is None:
            raise KeyError(capture_id)
        return self.images / entry["file"]

    def review(self, capture_id: str, task: str, label: str | None = None, keep: bool | None = None) -> dict:
        """An operator's word on one task's answer: the right class (classification), or whether a
        dense pre-label is good to keep (segmentation, detection, anomaly)."""
        with self._lock:
            entry = self.entries.get(capture_id)
            if entry is None:
                raise KeyError(capture_id)
            answer = entry["tasks"].get(task)
            if answer is None:
                raise PetahError(f"capture {capture_id} holds no answer of task {task!r}")
            if answer["kind"] == "classification":
                if label not in answer["labels"]:
                    raise PetahError(f"label must be one of task {task}'s classes, got {label!r}")
                item = {"id": capture_id, "task": task, "label": label, "time": round(time.time(), 3)}
            else:
                if not isinstance(keep, bool):
                    raise PetahError(f"a {answer['kind']} answer is kept or not: send keep true or false")
                item = {"id": capture_id, "task": task, "keep": keep, "time": round(time.time(), 3)}
            # a review is never refused for the limit (a line of ~100 bytes)
            self.used += self._log.append(self._line(item))
            self.corrections.setdefault(capture_id, {})[task] = item
            return self._view(capture_id)


def _answer(row: dict) -> dict:
    """What a capture keeps of one answer (no images: a mask is its own file)."""
    keep = {k: row[k] for k in ("label", "score", "confidence", "anomalous", "threshold", "pixels") if k in row}
    if "boxes" in row:
        keep["boxes"] = row["boxes"]
    return keep


def _review(correction: dict | None) -> dict | None:
    if correction is None:
        return None
    return {k: correction[k] for k in ("label", "keep", "time") if k in correction}


def export_captures(folder: str | Path, output: str | Path, include_unreviewed: bool = False) -> dict:
    """Write the reviewed captures in the layouts ``petah adapt`` reads, one folder per task:
    classification class folders (the operator's label), segmentation ``images/`` + ``masks/``
    (kept pre-labels) with ``classes.txt``, detection COCO JSON (kept pre-label boxes), anomaly
    ``good/`` and ``defect/`` folders. ``include_unreviewed``: the station's own answers too."""
    from PIL import Image

    folder, output = Path(folder), Path(output)
    if not (folder / INDEX).is_file():
        raise PetahError(f"{folder} is not a capture folder (no {INDEX})")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PetahError(f"--output {output} exists and is not an empty folder: give a new one")
    store = CaptureStore(folder, CaptureConfig(), sweep=False)
    counts: dict[str, int] = {}
    coco: dict[str, dict] = {}
    for capture_id in sorted(store.entries):
        entry, corrections = store.entries[capture_id], store.corrections.get(capture_id, {})
        image_file = store.images / entry["file"]
        if not image_file.is_file():
            continue
        for task, answer in entry["tasks"].items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", task):
                continue  # a task name petah would not accept: not a folder name to trust
            review = corrections.get(task)
            kind = answer["kind"]
            if kind == "classification":
                label = review["label"] if review else (answer.get("label") if include_unreviewed else None)
                if label is None or label not in answer["labels"]:
                    continue
                target = _inside(output, task, label, f"{capture_id}.png")
                _save_png(image_file, target)
            elif not (review.get("keep") if review is not None else include_unreviewed):
                continue  # a dense pre-label the operator discarded, or never looked at
            elif kind == "segmentation":
                mask = store.images / f"{capture_id}.{task}.mask.png"
                if not mask.is_file():
                    continue
                _save_png(image_file, _inside(output, task, "images", f"{capture_id}.png"))
                with Image.open(image_file) as picture, Image.open(mask) as handle:
                    handle.resize(picture.size, Image.NEAREST).save(_inside(output, task, "masks",
                                                                            f"{capture_id}.png"))
                (output / task / "classes.txt").write_text("\n".join(answer["labels"]) + "\n")
            elif kind == "detection":
                target = _inside(output, task, "images", f"{capture_id}.png")
                _save_png(image_file, target)
                categories = [{"id": i, "name": n} for i, n in enumerate(answer["labels"])]
                data = coco.setdefault(task, {"images": [], "annotations": [], "categories": categories})
                with Image.open(target) as handle:
                    width, height = handle.size
                image_id = len(data["images"]) + 1
                data["images"].append({"id": image_id, "file_name": f"images/{capture_id}.png", "width": width,
                                       "height": height})
                for box in answer.get("boxes", []):
                    x0, y0, x1, y1 = box["box"]
                    data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                                "category_id": answer["labels"].index(box["label"]),
                                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                                "iscrowd": 0})
            else:  # anomaly: the decision, confirmed
                part = "defect" if answer.get("anomalous") else "good"
                _save_png(image_file, _inside(output, task, part, f"{capture_id}.png"))
            counts[task] = counts.get(task, 0) + 1
    for task, data in coco.items():
        atomic_write_bytes(_inside(output, task, "annotations.json"), json.dumps(data).encode())
    if output.is_dir():
        fsync_folder(output)
    return {"output": str(output), "tasks": counts, "captures": len(store.entries)}


def _inside(output: Path, *parts: str) -> Path:
    path = inside(output, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_png(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as handle:
        handle.convert("RGB").save(target, format="PNG")


__all__ = ["STRATEGIES", "CaptureConfig", "CaptureStore", "export_captures"]
