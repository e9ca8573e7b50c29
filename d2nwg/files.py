"""Safetensors and JSON files written atomically and read with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch

from d2nwg.errors import D2NWGError, FileFormatError, FileWriteError


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` to ``path``: a temporary file in the same folder, then a rename, so a
    reader never sees a half-written file and a failed write leaves nothing behind."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
        os.close(fd)
        _default_mode(tmp)
    except OSError as exc:
        raise FileWriteError(f"{path}: cannot write here ({exc})") from exc
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, D2NWGError):
            # SafetensorError (a full disk), OSError, or a tensor safetensors cannot store
            raise FileWriteError(
                f"{path}: could not be written ({type(exc).__name__}: "
                f"{str(exc)[:300]}); nothing was left behind"
            ) from exc
        raise


def save_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``.

    ``obj`` is serialized first (NaN and Inf refused: they are not JSON), so an object that
    cannot be written leaves no file at all.
    """
    path = os.fspath(path)
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    _default_mode(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_json(path: str | os.PathLike) -> object:
    """The parsed content of a JSON file; FileFormatError naming the file if missing or invalid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError, RecursionError) as exc:  # bad syntax, encoding, deep nesting
        raise FileFormatError(f"{path}: not a readable JSON file: {exc}") from exc


def read_safetensors(
    path: str | os.PathLike, *, load_tensors: bool = True, device: str | torch.device = "cpu"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; FileFormatError if missing or unreadable."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if load_tensors else {}
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise FileFormatError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return metadata, tensors


def loads_json(text: str, where: str, *, allow_nan: bool = False) -> object:
    """Parse JSON text read from a file; any malformed text raises FileFormatError naming
    ``where`` (the file, and the field it came from). Besides syntax errors this covers what
    ``json.loads`` raises other than JSONDecodeError: integers of more than 4300 digits
    (ValueError), nesting deep enough to exhaust the stack (RecursionError), and, unless
    ``allow_nan``, the non-JSON constants NaN, Infinity and -Infinity."""
    if not isinstance(text, str):
        raise FileFormatError(f"{where}: expected JSON text, got {type(text).__name__}")

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=None if allow_nan else no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FileFormatError(
            f"{where}: invalid JSON ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def parse_json_metadata(
    metadata: dict[str, str], key: str, path: str | os.PathLike, what: str
) -> object:
    """The JSON value stored under ``key`` in a safetensors file's metadata."""
    path = os.fspath(path)
    if key not in metadata:
        raise FileFormatError(f"{path}: no {what} (metadata key {key!r}) in the file")
    return loads_json(metadata[key], f"{path}: metadata {key!r}")


def _default_mode(path: str) -> None:
    """mkstemp creates 0600 files; give the final file the mode open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
