"""Exceptions raised by d2nwg.

Every error the library raises on bad input is a :class:`D2NWGError`. The subclasses also
derive from the matching builtin (``KeyError``, ``ValueError``, ``TypeError``) so that code
written against plain PyTorch conventions keeps catching them.
"""

from __future__ import annotations


class D2NWGError(Exception):
    """Base class of every error raised by d2nwg."""


class KeyMismatchError(D2NWGError, KeyError):
    """A state dict has missing or unexpected keys."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeError(D2NWGError, ValueError):
    """A tensor has the wrong shape or rank."""


class DTypeError(D2NWGError, TypeError):
    """A tensor has an unsupported or mismatched dtype."""


class DeviceError(D2NWGError, ValueError):
    """Tensors that must share a device do not."""


class NonFiniteError(D2NWGError, ValueError):
    """A tensor holds NaN or Inf where finite values are required."""


class ConfigError(D2NWGError, ValueError):
    """An argument or configuration value is out of range or unknown."""


class FileFormatError(D2NWGError, ValueError):
    """A file is missing, truncated, of a newer format version, or does not match."""


class FileWriteError(D2NWGError, OSError):
    """A file could not be written (full or read-only disk, or content the format cannot
    hold); the message names the path, and no partial file is left behind."""


class DirectoryLockedError(FileWriteError):
    """Another writer holds the directory (see :func:`d2nwg.files.directory_lock`); the message
    names the directory and the holder's pid and host."""


class StaleLockWarning(UserWarning):
    """A directory lock left by a writer that no longer runs was taken over."""


class BackendUnavailableError(D2NWGError, RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


def shape_of(x: object) -> object:
    """For error messages: a tensor's shape as a tuple, or the type name of anything else."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None and hasattr(x, "dtype") else type(x).__name__


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn naming the user's line: the first frame outside d2nwg and torch (whose decorators,
    such as ``torch.no_grad``, wrap public functions), however deep the call."""
    import os
    import sys
    import warnings

    import torch

    inside = (
        os.path.dirname(os.path.abspath(__file__)) + os.sep,
        os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    )
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
