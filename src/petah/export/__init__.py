"""Export for devices: ONNX per task with adapters merged."""

from petah.export.onnx import ExportResult, export_merged, merged_task_module

__all__ = ["ExportResult", "export_merged", "merged_task_module"]
