"""Files: hashing, atomic writes, output-path checks, and a file's kind from its suffix."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from resopt.errors import InputFileError, OutputError, UsageError

KIND_BY_SUFFIX = {".pt": "pt", ".pth": "pt", ".onnx": "onnx", ".engine": "engine", ".plan": "engine"}
# Suffixes of PyTorch checkpoints written elsewhere: `resopt import` turns them into resopt artifacts (its
# PyTorch source in importer.SOURCES reads these, in this order, which its error line lists).
FOREIGN_PT_SUFFIXES = (".pt", ".pth", ".th", ".ckpt", ".tar")
IMPORT_HINT = "bring it in with `resopt import {path} --mean R,G,B --std R,G,B --data DATA -o model.pt`"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The outputs this process has put in place (atomic_output with commit=True): once one is there, the CLI
# lets the command finish instead of stopping it on SIGINT/SIGTERM (see ``outputs_placed``).
_PLACED: list[Path] = []


def outputs_placed() -> list[Path]:
    """The outputs renamed into place so far by this process (the CLI resets it per command)."""
    return list(_PLACED)


def reset_outputs_placed() -> None:
    _PLACED.clear()


@contextlib.contextmanager
def atomic_output(path: Path, *, commit: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` only if the block succeeds.

    A failed or interrupted command (an exception, Ctrl-C, or SIGTERM, which the CLI turns into an
    exception) therefore never leaves a truncated artifact behind. A full disk is one line naming the
    output, whichever library was writing (torch.save reports it as a RuntimeError).

    ``commit=True`` (a command's result) records the rename in ``outputs_placed``: from then on the CLI
    defers SIGINT/SIGTERM until the command has finished (see ``resopt.cli.run``). ``commit=False`` is for
    files written on the way (the resume state, a calibration cache), after which an interrupt still stops
    the command.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                # The name is chosen, and known to the ``finally``, before the file exists: a signal that lands
                # while (or just after) it is created still finds it there and removes it. mkstemp creates the
                # file before returning its name, which left a 0-byte temporary file behind.
                tmp_path = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
                try:
                    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    break
                except FileExistsError:
                    tmp_path = None  # someone else's file: never remove it
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            yield tmp_path
            # The temporary file is created 0600; give the artifact the permissions a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            if commit:
                # Recorded before the rename, so that a signal arriving during os.replace is deferred too.
                _PLACED.append(path)
            try:
                os.replace(tmp_path, path)
            except BaseException:
                if commit:
                    _PLACED.remove(path)
                raise
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not _is_torch_write_error(e):
                raise
            raise OutputError(f"could not write {path}: {_write_failure(e, path)}") from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _is_torch_write_error(e: RuntimeError) -> bool:
    """torch.save reports a failed write (disk full, file size limit) as a RuntimeError from its zip writer."""
    text = str(e)
    return "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text


def _write_failure(e: BaseException, path: Path) -> str:
    """Why a write failed, in words: the disk being full is the usual cause torch does not name."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return e.strerror or "no space left"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    if free == 0:
        return "no space left on the device"
    text = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[-1].strip()
    return f"{text[:160]} (disk full or file size limit?)" if isinstance(e, RuntimeError) else text[:160]


def write_text_atomic(path: Path, text: str, *, commit: bool = True) -> None:
    with atomic_output(path, commit=commit) as tmp:
        tmp.write_text(text)


def check_output_path(output: Path, *inputs: Path | str | None, suffixes: tuple[str, ...] | None = None,
                      option: str = "output") -> Path:
    """Check an output before any work: right suffix, not a folder, not any input, in a writable folder.

    ``inputs`` are every file and data folder the command reads (outputs never have an image suffix, so one
    written inside a data folder cannot change what is read there). Returns the output path. Called by
    every command that writes, so a bad ``-o`` fails in a second rather than after the training.
    """
    output = Path(output)
    if suffixes and output.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {output} must end in {' or '.join(suffixes)}")
    if output.is_dir():
        raise UsageError(f"{option} {output} is a folder; give a file name inside it")
    if output.exists() and not output.is_file():
        raise UsageError(f"{option} {output} exists and is not a regular file")
    resolved = output.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = Path(inp).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if resolved == src:
            raise UsageError(f"{option} {output} is the same file as the input {inp}; choose another {option}")
    folder = _existing_parent(resolved)
    if not folder.is_dir():
        raise UsageError(f"{option} {output}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {output}: folder {folder} is not writable")
    return output


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor (atomic_output creates missing folders below it)."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def artifact_kind(path: Path) -> str:
    """``pt``, ``onnx`` or ``engine`` from the file's suffix; a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist" + (" (a dangling link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise InputFileError(f"{path} is a folder, not a model file")
    require_regular(path)
    kind = KIND_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise InputFileError(
            f"{path} is not a model file resopt knows (suffix {path.suffix or 'none'!r}); "
            f"expected one of: {', '.join(sorted(KIND_BY_SUFFIX))}",
            hint=IMPORT_HINT.format(path=path) if path.suffix.lower() in FOREIGN_PT_SUFFIXES else None,
        )
    return kind


def require_regular(path: Path, what: str = "file") -> None:
    """Refuse FIFOs, devices and sockets: reading one can block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise InputFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputFileError(f"{what} {path} is not a regular file (a pipe, device or socket); refusing to read it")


def require_kind(path: Path, *kinds: str, hint: str | None = None) -> str:
    kind = artifact_kind(path)
    if kind not in kinds:
        raise InputFileError(f"{path} is a .{kind} file; this command takes {' or '.join('.' + k for k in kinds)}",
                             hint=hint)
    return kind
