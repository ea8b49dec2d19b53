"""Export for devices: ONNX per task with adapters merged, or one base ONNX + ORT adapter files."""

from petah.export.onnx import ExportResult, export_merged, merged_task_module
from petah.export.ort_adapters import AdapterExport, export_base_and_adapters

__all__ = ["AdapterExport", "ExportResult", "export_base_and_adapters", "export_merged", "merged_task_module"]
