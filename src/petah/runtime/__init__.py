"""Many tasks on one resident backbone (switching, merged mode, reload with rollback)."""

from petah.runtime.runtime import MODES, Runtime, RuntimeTask

__all__ = ["MODES", "Runtime", "RuntimeTask"]
