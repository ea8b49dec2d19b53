"""ONNX Runtime sessions as every petah engine opens them, and the heap they leave behind."""

from __future__ import annotations

import ctypes


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # deliberate: spinning intra-op threads slow every other process
    options.inter_op_num_threads = 1
    # one thread pool per session: idle pools must not spin, or every added task slows the others
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def release_memory() -> None:
    """After a task change, give freed heap pages back to the system, so a station that swaps for
    months does not grow (glibc keeps them otherwise). No gc.collect(): it holds the GIL for its
    whole run, a pause for every request; replaced structures are freed without it (``retire``)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere there is nothing to call
    except (OSError, AttributeError):
        pass


__all__ = ["release_memory", "session_options"]
