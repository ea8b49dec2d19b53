"""ONNX Runtime sessions as every petah engine opens them."""

from __future__ import annotations


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # deliberate: spinning intra-op threads slow every other process
    options.inter_op_num_threads = 1
    # one thread pool per session: idle pools must not spin, or every added task slows the others
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


__all__ = ["session_options"]
