"""Zip archives read defensively, framework-free: `.pt2`, `.npz` and `.keras` files are zips.

One pass over the central directory refuses what makes zip readers disagree (a name twice, `..` or absolute
names, NUL bytes, encryption, unusual compression), and every member is read in chunks against a cap given
before reading, so a small file cannot expand to gigabytes in memory.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from typing import IO

from .errors import DeadNeuronError

CHUNK = 1 << 20
# Errors a damaged or hostile zip raises while being opened or read.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error)


def name_problem(name: str) -> str | None:
    """Why a member name is not a plain relative path, or None when it is."""
    if not name:
        return "has an empty name"
    if "\x00" in name or any(ord(c) < 32 for c in name):
        return "has a control character in its name"
    if "\\" in name:
        return "has a backslash in its name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute name"
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has a '.', '..' or empty part in its name"
    return None


# Python's zip reader holds the whole central directory in memory, and an object of several hundred bytes per
# member: a 100 MB file of a million empty members took 650 MB. This many bytes of directory is some 70,000
# members of the names torch.save, torch.export, numpy and Keras write (each holds a few to a few thousand).
DIRECTORY_LIMIT = 8 << 20


def directory_size(source: str | IO[bytes]) -> int:
    """The size of the zip's central directory as its end record declares it (what Python's reader reads whole
    when it opens the zip); 0 when there is no end record (then no zip reader opens it)."""
    if isinstance(source, str):
        with open(source, "rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    else:
        position = source.tell()
        end = zipfile._EndRecData(source)  # type: ignore[attr-defined]
        source.seek(position)
    return int(end[zipfile._ECD_SIZE]) if end else 0  # type: ignore[attr-defined]


def check_directory(source: str | IO[bytes], *, what: str, expected: str) -> None:
    """Refuse a zip whose central directory is larger than DIRECTORY_LIMIT, before any reader parses it."""
    size = directory_size(source)
    if size > DIRECTORY_LIMIT:
        raise DeadNeuronError(
            f"{what}: its zip directory is {size:,} bytes (hundreds of thousands of members), more than the "
            f"{DIRECTORY_LIMIT:,} a model or data archive needs; refused (reading it would exhaust memory); "
            f"expected {expected}"
        )


def open_zip(source: str | IO[bytes], *, what: str, kind: str, expected: str) -> zipfile.ZipFile:
    """`source` opened as a zip, after one pass over its central directory that refuses an archive two zip readers
    could read differently. `what` names the file in messages ("model.pt2"), `kind` what it should be ("a
    torch.export archive") and `expected` where such a file comes from."""
    try:
        check_directory(source, what=what, expected=expected)
        archive = zipfile.ZipFile(source)
    except ZIP_ERRORS as error:
        raise DeadNeuronError(
            f"{what} is not {kind} (not a readable zip file: corrupt or truncated, or another format); "
            f"expected {expected}"
        ) from error
    seen: set[str] = set()
    for info in archive.infolist():
        raw = info.orig_filename  # zipfile cuts a name at NUL; the raw name is what another reader sees
        problem = name_problem(raw)
        if problem is None and info.filename in seen:
            problem = "appears twice (zip readers disagree on which copy they read)"
        if problem is None and info.flag_bits & 0x1:
            problem = "is encrypted"
        if problem is None and info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            problem = "is stored uncompressed but declares a size other than its size on disk"
        if problem is None and info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problem = f"uses compression method {info.compress_type} (expected stored or deflated)"
        if problem is not None:
            archive.close()
            raise DeadNeuronError(
                f"{what}: the member {raw[:80]!r} {problem}; refused; expected {expected}"
            )
        seen.add(info.filename)
    return archive


def _too_big(what: str, info: zipfile.ZipInfo, limit: int) -> DeadNeuronError:
    return DeadNeuronError(
        f"{what}: the member {info.filename} expands to {info.file_size:,} bytes, more than the {limit:,} this "
        "member may hold; refused (a small file that expands to this much is a zip bomb or a damaged file)"
    )


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limit: int, what: str) -> bytes:
    """The bytes of one member, read in chunks; DeadNeuronError when it holds, or declares, more than `limit`."""
    if info.file_size > limit:
        raise _too_big(what, info, limit)
    out = bytearray()
    with archive.open(info) as stream:
        while chunk := stream.read(min(CHUNK, limit + 1 - len(out))):
            out += chunk
            if len(out) > limit:
                raise _too_big(what, info, limit)
    if len(out) != info.file_size:
        raise DeadNeuronError(f"{what}: the member {info.filename} is shorter than its header says (truncated?)")
    return bytes(out)


def read_member_into(archive: zipfile.ZipFile, info: zipfile.ZipInfo, buffer: memoryview, *, what: str) -> None:
    """Fill `buffer` (exactly the member's size) with the member's bytes, in chunks, without a second copy."""
    if info.file_size != buffer.nbytes:
        raise DeadNeuronError(
            f"{what}: the member {info.filename} holds {info.file_size:,} bytes, expected {buffer.nbytes:,}"
        )
    with archive.open(info) as stream:
        fill(stream, buffer, what=f"{what}: the member {info.filename}")


def fill(stream: IO[bytes], buffer: memoryview, *, what: str) -> None:
    """Fill `buffer` from `stream` in chunks (no second copy of the data); DeadNeuronError if it ends first."""
    view = buffer.cast("B")
    filled = 0
    while filled < view.nbytes:
        chunk = stream.read(min(CHUNK, view.nbytes - filled))
        if not chunk:
            raise DeadNeuronError(f"{what} ended early (truncated file?)")
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


def check_stored_zip(data: bytes, *, what: str, expected: str) -> None:
    """A zip held in memory (a file nested in an archive) whose members are all stored: it then holds no more
    than its own size, whatever reader opens it later."""
    _check_stored(io.BytesIO(data), len(data), what=what, kind="a zip archive", expected=expected)


def check_stored_zip_file(path: str, *, kind: str, expected: str) -> None:
    """The same for a zip file on disk (a torch.save file: torch's reader opens it next)."""
    import os

    _check_stored(path, os.path.getsize(path), what=path, kind=kind, expected=expected)


def _check_stored(source: str | IO[bytes], size: int, *, what: str, kind: str, expected: str) -> None:
    with open_zip(source, what=what, kind=kind, expected=expected) as archive:
        total = 0
        for info in archive.infolist():
            total += info.file_size
            if info.compress_type != zipfile.ZIP_STORED or total > size:
                raise DeadNeuronError(
                    f"{what}: the member {info.filename} is compressed or larger than its archive; refused (a "
                    f"small file must not expand in memory); expected {expected}"
                )
