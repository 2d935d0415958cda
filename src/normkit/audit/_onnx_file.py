"""An ONNX file, read safely before anything runs it: for ``audit_onnx`` and for the
command line's ONNX targets.  Every failure is a ``TargetError`` with a one-line message."""

from __future__ import annotations

import os


class TargetError(ValueError):
    """The target cannot be loaded; the message says why, in one line.  A ``ValueError``, so
    that ``normkit.audit_onnx(path)`` callers catch it as the bad argument it is."""


def error_line(e: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_onnx(path: str):
    """An ONNX file with its external data, checked before anything reads it: not empty, a
    ModelProto with a graph, every external data file present and long enough for its
    tensors, and valid for ``onnx.checker``.  Returns the ``onnx.ModelProto``."""
    try:
        import onnx
        import onnx.numpy_helper as nh
        from onnx.external_data_helper import (
            ExternalDataInfo,
            load_external_data_for_model,
            uses_external_data,
        )
    except ImportError:
        raise TargetError('reading .onnx needs onnx and onnxruntime: pip install '
                          '"normkit[export]"') from None
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise TargetError(f"cannot read {path}: {e.strerror or e}") from None
    if size == 0:
        raise TargetError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise TargetError(f"cannot read {path} as ONNX: {error_line(e)}") from None
    # An empty or foreign protobuf can parse as a ModelProto with no graph at all.
    if not proto.HasField("graph") or not proto.graph.node:
        raise TargetError(f"{path} holds no graph (no ONNX nodes): not an ONNX model")
    base = os.path.dirname(os.path.abspath(path))
    external = {t.name: ExternalDataInfo(t).location for t in proto.graph.initializer
                if uses_external_data(t)}
    for name, location in external.items():
        if not os.path.isfile(os.path.join(base, location)):
            raise TargetError(f"{path}: its external data file {location} (tensor {name!r}) "
                              "is missing")
    try:
        load_external_data_for_model(proto, base)
        for t in proto.graph.initializer:
            nh.to_array(t)  # a short external data file leaves a tensor without its bytes
    except Exception as e:
        what = (f"its external data ({', '.join(sorted(set(external.values())))})" if external
                else "its tensors")
        raise TargetError(f"cannot read {what} for {path}: {error_line(e)}") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise TargetError(f"{path} is not a valid ONNX model: {error_line(e)}") from None
    return proto
