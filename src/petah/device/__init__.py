"""The device side's engine parts, without torch: the backbone a build machine exported
(``bundle``), a task package merged into it with numpy and run by ONNX Runtime (``task``), and
the numpy decoding of answers (``decode``)."""

from petah.device.bundle import DeviceBackbone, read_device_backbone
from petah.device.task import HEAD_KINDS, TaskGraph, merged_weights, task_graph

__all__ = ["HEAD_KINDS", "DeviceBackbone", "TaskGraph", "merged_weights", "read_device_backbone", "task_graph"]
