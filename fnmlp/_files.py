"""Files written safely and read with care, for every kind of file fnmlp writes (checkpoints,
saved pipelines): a check that a path can be written before any work, atomic writes, and plain
words for a zip archive (``torch.save``'s format, skops') that is truncated or corrupted."""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
import zipfile
from typing import BinaryIO


def zip_damage(path: str, error: BaseException | None = None, *,
               data: bytes | None = None) -> str | None:
    """What is wrong with a zip file (a checkpoint, a saved pipeline) that did not load, in
    plain words ("truncated: ...", "corrupted (checksum mismatch in ...): ..."), from its zip
    structure and the CRC-32 of every entry (``torch.save`` writes them; ``torch.load`` does
    not check them); None when it is no
    zip archive or an intact one (then it is foreign, not damaged). ``error``: what torch's
    reader raised; a failure of its zip reader on an archive that Python's reads is damage too
    (every file ``torch.save`` writes reads back). ``data``: the file's bytes, as read once
    for loading: then they are judged (the very bytes that failed to load), not what ``path``
    holds now."""
    try:
        size = len(data) if data is not None else os.path.getsize(path)
        with _open(path, data) as file:
            start = file.read(len(ZIP_START))
        whole = has_end_record(path, size, data)
    except OSError:
        return None
    if size < len(ZIP_START):
        return (f"truncated: the file has {size} bytes, too few for a zip archive"
                if ZIP_START.startswith(start) else None)
    if not whole:
        return None if start != ZIP_START else (
            f"truncated: the file ends after {size} bytes, before the end of its zip archive "
            "(an interrupted write or copy); use an intact copy")
    try:
        with _open(path, data) as file, zipfile.ZipFile(file) as archive:
            bad = bad_entry(archive)
            names = archive.namelist()
    except zipfile.BadZipFile as zip_error:
        return f"corrupted: its zip archive is damaged ({zip_error})"
    except Exception as zip_error:  # odd lengths or names: struct, Unicode, overflow errors
        return f"corrupted: its zip archive is damaged ({summary(zip_error)})"
    if bad is not None:
        return (f"corrupted (checksum mismatch in {bad}): its contents are not what was "
                "written; use an intact copy")
    if (error is not None and any(name.endswith("/data.pkl") for name in names)
            and any(word in str(error) for word in ("PytorchStreamReader", "inline_container"))):
        return "corrupted: its zip archive is damaged"
    return None


ZIP_START = b"PK\x03\x04"  # a local file header: what every torch.save file starts with
ZIP_END = b"PK\x05\x06"  # the end of central directory record, the last thing in a zip
ZIP_END_SIZE = 22  # its length without a comment


def has_end_record(path: str, size: int, data: bytes | None = None) -> bool:
    """Whether the file at ``path`` (or its bytes ``data``) ends in a whole zip end record (22
    bytes, then a comment, which ``torch.save`` never writes), looked for in the last 64 KiB +
    22 bytes: a file cut short loses it, or part of it, whatever else it kept."""
    with _open(path, data) as file:
        file.seek(max(0, size - (1 << 16) - ZIP_END_SIZE))
        tail = file.read()
    found = tail.rfind(ZIP_END)
    return found >= 0 and len(tail) - found >= ZIP_END_SIZE


def _open(path: str, data: bytes | None) -> BinaryIO:
    """The file's bytes ``data`` (when given) or the file at ``path``, open for reading."""
    return io.BytesIO(data) if data is not None else open(path, "rb")


def bad_entry(archive: zipfile.ZipFile) -> str | None:
    """The first entry whose bytes fail their CRC-32 (None if all pass); entries written
    without one (CRC 0: ``torch.serialization.set_crc32_options(False)``) are only opened."""
    for info in archive.infolist():
        try:
            with archive.open(info) as entry:
                while info.CRC and entry.read(1 << 20):
                    pass
        except zipfile.BadZipFile as error:
            if "CRC" in str(error):
                return info.filename
            raise
    return None


def summary(error: BaseException) -> str:
    """``Type: message``, the message cut to its first sentence or line (at most ~160
    characters, cut between words): library messages can run to paragraphs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    sentence = text.split(". ")[0]
    if len(sentence) > 160:
        sentence = sentence[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def check_writable(path, what: str = "checkpoint") -> str:
    """``path`` as a string; an ``OSError`` naming it (the ``what`` at it), before any work, when
    no such file can
    be written there: it is a directory, or its folder is missing or not writable by this
    process (root may write anywhere: then the write is tried, and its failure named too)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write the {what} {path}: it is a "
                                f"directory; name a file in it, such as "
                                f"{os.path.join(path, 'run.fnmlp')}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot write the {what} {path}: its folder "
                                f"{folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write the {what} {path}: its folder "
                              f"{folder} is not writable")
    return path


def write_error(path: str, error: OSError, what: str = "checkpoint") -> OSError:
    """``error`` (its type and errno kept) with a message that names the checkpoint ``path``
    (a ``what``) rather than the temporary file the error was about."""
    message = f"cannot write the {what} {path}: {error.strerror or error}"
    return type(error)(message) if error.errno is None else type(error)(error.errno, message)


_TEMPORARY_TRIES = 10


def _create_temporary(folder: str) -> tuple[int, str]:
    """A new, empty file ``.fnmlp-<random hex>.tmp`` in ``folder``, created exclusively (never
    one that exists) with mode 0o666 less the umask, as an ordinary new file (the kernel
    applies the umask: nothing reads or sets the process's own, which other threads share);
    its descriptor, open for writing, and its path. A name taken already is drawn again, a
    few times."""
    def create() -> tuple[int, str]:
        temporary = os.path.join(folder, f".fnmlp-{secrets.token_hex(8)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        return os.open(temporary, flags, 0o666), temporary

    for _ in range(_TEMPORARY_TRIES - 1):
        try:
            return create()
        except FileExistsError:
            continue
    return create()


def _same_file(path: str, status: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``status`` describes (not one put in its place)."""
    now = os.stat(path)
    return (now.st_ino, now.st_dev) == (status.st_ino, status.st_dev)


def _settle_replacement(path: str, mode: int) -> None:
    """Give the file a writer made anew at ``path`` the ``mode`` of the one created for it
    (an ordinary new file's: the umask applied by the kernel), and fsync it: it, not the
    file it replaced, is what is renamed over the target."""
    os.chmod(path, mode)
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(path: str, write, what: str = "checkpoint") -> None:
    """Write a file to ``path`` through a temporary file in the same folder, flushed, fsynced
    and renamed over it: ``path`` holds the old file or the new one, never part of one.
    ``write(file, temporary)`` writes it (to the open ``file``, or by the name ``temporary``).
    The file gets an ordinary new file's mode, 0o666 less the umask (``_create_temporary``).
    An ``OSError`` names ``path``; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = _create_temporary(folder)
    except OSError as error:
        raise write_error(path, error, what) from error
    try:
        with os.fdopen(handle, "wb") as file:
            write(file, temporary)
            file.flush()
            created = os.fstat(file.fileno())
            if _same_file(temporary, created):
                os.fsync(file.fileno())
            else:  # a writer that made a new file by the name (safetensors: mode 0600)
                _settle_replacement(temporary, stat.S_IMODE(created.st_mode))
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise write_error(path, error, what) from error
        raise
    try:  # the rename itself, on disk
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
