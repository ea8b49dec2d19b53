"""Task kinds: each supplies a head builder, loss, metrics and decode."""

from petah.errors import PetahError
from petah.tasks.anomaly import Anomaly, AnomalyModel
from petah.tasks.classification import Classification, ClassificationModel, plot_confusion
from petah.tasks.detection import Detection, DetectionModel
from petah.tasks.segmentation import Segmentation, SegmentationModel

TASK_KINDS = {kind.kind: kind for kind in (Classification, Segmentation, Detection, Anomaly)}


def task_kind(name: str):
    if name not in TASK_KINDS:
        raise PetahError(f"unknown task kind {name!r}; known: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[name]


def kind_for_data(data):
    """The task kind a dataset is labelled for (per-pixel masks: segmentation; boxes: detection;
    good / anomalous images: anomaly)."""
    from petah.data.anomaly import AnomalyImages
    from petah.data.detection import BoxedImages
    from petah.data.segmentation import MaskedImages

    if isinstance(data, AnomalyImages):
        return Anomaly
    if isinstance(data, MaskedImages):
        return Segmentation
    return Detection if isinstance(data, BoxedImages) else Classification


__all__ = ["Anomaly", "AnomalyModel", "Classification", "ClassificationModel", "Detection", "DetectionModel",
           "Segmentation", "SegmentationModel", "TASK_KINDS", "kind_for_data", "plot_confusion", "task_kind"]
