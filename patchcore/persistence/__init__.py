"""Persistence: detector states to model files and back (``model_file``), and atomic writes (``atomic``).

This layer knows the file format and its versions, never a detector class: detectors hand it a
:class:`~patchcore.persistence.model_file.DetectorState` and get one back.
"""

from .atomic import atomic_write, write_bytes
from .model_file import (
    FORMAT_VERSION,
    DetectorState,
    check_model_target,
    read_document,
    read_header,
    read_state,
    state_from_bytes,
    state_to_bytes,
    write_state,
)

__all__ = [
    "FORMAT_VERSION",
    "DetectorState",
    "check_model_target",
    "atomic_write",
    "read_document",
    "read_header",
    "read_state",
    "state_from_bytes",
    "state_to_bytes",
    "write_bytes",
    "write_state",
]
