"""Many tasks on one resident backbone (switching, merged mode, reload with rollback)."""

from petah.runtime.runtime import MODES, PreparedTask, Runtime, RuntimeTask

__all__ = ["MODES", "PreparedTask", "Runtime", "RuntimeTask"]
