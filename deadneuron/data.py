"""Data files and batching, framework-free.

`.npz` (key `x`, optional `y`) and `.npy` are memory-mapped, so a file larger than memory streams batch by batch.
Framework tensors and loaders are left to the host data plan (`core/plan.py`) and the backends.
"""

from __future__ import annotations

import mmap
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DeadNeuronError

# The keyword inputs of transformers-style models (what a tokenizer, a processor or a collator returns). A batch
# mapping without 'x' that holds one of them is the model's keyword arguments; its labels are under LABEL_KEYS.
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "pixel_values",
    "pixel_mask",
    "input_values",
    "input_features",
    "decoder_input_ids",
    "decoder_attention_mask",
)
LABEL_KEYS = ("labels", "label")
_X_KEYS = ("x", "input", "inputs")


@dataclass
class Dataset:
    """Inputs and optional labels held as arrays (possibly memory-mapped). `x` is one array, or a dict of arrays
    of equal length: the model's keyword inputs (`input_ids`, `attention_mask`, ...)."""

    x: np.ndarray | dict[str, np.ndarray]
    y: np.ndarray | None = None
    source: str = "array"

    def __len__(self) -> int:
        return int(_first(self.x).shape[0])


def _first(x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(x.values())) if isinstance(x, dict) else x


def rows(x: Any, start: int, stop: int) -> Any:
    return {key: value[start:stop] for key, value in x.items()} if isinstance(x, dict) else x[start:stop]


def split_mapping(batch: Any, what: str) -> tuple[Any, Any]:
    """(x, y) of a mapping: its 'x' and 'y' keys, or the model's keyword inputs (any key but the labels) and the
    labels when it holds one of MODEL_INPUT_KEYS; DeadNeuronError naming the keys otherwise."""
    for key in _X_KEYS:
        if key in batch:
            return batch[key], batch.get("y", next((batch[k] for k in LABEL_KEYS if k in batch), None))
    if any(key in batch for key in MODEL_INPUT_KEYS):
        x = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
        return x, next((batch[key] for key in LABEL_KEYS if key in batch), None)
    keys = ", ".join(map(repr, batch)) or "none"
    raise DeadNeuronError(
        f"{what} is a mapping with keys {keys}; expected 'x' (and 'y' for labels) or a model's keyword inputs "
        f"({', '.join(MODEL_INPUT_KEYS[:3])}, pixel_values, ...; labels under 'labels'); rename the keys"
    )


def _check_numeric(array: np.ndarray, what: str, path: str) -> None:
    if array.dtype.kind not in "biuf":
        raise DeadNeuronError(
            f"{path}: {what} holds {array.dtype} values; expected numbers (float or int); convert it with "
            "numpy.asarray(values, dtype='float32')"
        )


# A compressed .npz member cannot be memory-mapped: it is decompressed into memory, at most this much of it.
NPZ_COMPRESSED_LIMIT = 256 << 20
NPZ_EXPECTED = "a .npz written by numpy.savez with key 'x' (optional 'y')"


def _npz_arrays(path: str, samples: int | None) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray | None]:
    """x and y of an .npz: stored members memory-mapped, compressed ones decompressed in chunks up to
    NPZ_COMPRESSED_LIMIT (only the first `samples` rows when given). Without 'x', arrays named after a model's
    keyword inputs (`input_ids`, `attention_mask`, ...) are x as a dict, and 'labels' (or 'label') is y."""
    from .archive import open_zip

    with open_zip(path, what=path, kind="a .npz file", expected=NPZ_EXPECTED) as archive:
        members = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise DeadNeuronError(
                    f"{path} holds {info.filename!r}, which is not a .npy array, so it is not a .npz file; "
                    f"expected {NPZ_EXPECTED}"
                )
            members[info.filename[:-4]] = info
        if "x" not in members and any(key in members for key in MODEL_INPUT_KEYS):
            arrays = {name: _npz_member(path, archive, info, samples) for name, info in members.items()}
            labels = next((arrays.pop(key) for key in LABEL_KEYS if key in arrays), None)
            return arrays, labels
        if "x" not in members:
            raise DeadNeuronError(
                f"{path} has no array named 'x' (it has: {', '.join(members) or 'none'}); save the inputs as "
                "numpy.savez(path, x=inputs, y=labels), or a model's keyword inputs as numpy.savez(path, "
                "input_ids=..., attention_mask=..., labels=...)"
            )
        x = _npz_member(path, archive, members["x"], samples)
        y = _npz_member(path, archive, members["y"], samples) if "y" in members else None
    return x, y


def _npz_member(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, samples: int | None) -> np.ndarray:
    from .archive import fill

    name = info.filename[:-4]
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
        header_end = member.tell()
    if dtype.hasobject:
        raise DeadNeuronError(
            f"{path}: {name} holds Python objects, which are refused (loading them could run code); save plain "
            "numeric arrays"
        )
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if info.file_size != header_end + nbytes:
        raise DeadNeuronError(
            f"{path}: {name} declares shape {shape} ({nbytes:,} bytes) but holds {info.file_size - header_end:,} "
            f"bytes; the file is damaged; expected {NPZ_EXPECTED}"
        )
    if info.compress_type == zipfile.ZIP_STORED:
        offset = info.header_offset + _local_header_size(path, info) + header_end
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    rows = int(shape[0]) if shape else 1
    take = rows if samples is None or fortran or not shape else min(rows, max(samples, 0))
    size = nbytes // rows * take if rows else 0
    if size > NPZ_COMPRESSED_LIMIT:
        raise DeadNeuronError(
            f"{path}: {name} is compressed and would take {size:,} bytes of memory to decompress, more than "
            f"{NPZ_COMPRESSED_LIMIT:,}; save it uncompressed (numpy.savez, not savez_compressed) or as a .npy, "
            "which are read batch by batch, or pass --samples N to read fewer samples"
        )
    out = np.empty(size // dtype.itemsize, dtype=dtype)
    with archive.open(info) as member:
        member.read(header_end)
        fill(member, out.view(np.uint8).data, what=f"{path}: {name}")
    return out.reshape((take, *shape[1:]) if shape else (), order="F" if fortran else "C")


def _local_header_size(path: str, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return 30 + name_length + extra_length


def _check_npy_size(path: str) -> None:
    """Refuse a .npy whose header declares more (or less) data than the file holds, told from the header alone
    (numpy's own check overflows on a shape like (2**62, 2**62), and warns on stderr doing so)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        header_end = handle.tell()
    if dtype.hasobject:
        return  # np.load says so, without unpickling
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = os.path.getsize(path) - header_end
    if nbytes != held:
        raise DeadNeuronError(
            f"{path} declares shape {tuple(shape)} ({nbytes:,} bytes) but holds {held:,} bytes; the file is damaged; "
            "expected a .npy written by numpy.save"
        )


def load_data_file(path: str | os.PathLike[str], samples: int | None = None) -> Dataset:
    """Open a `.npz` (x, optional y) or `.npy` (x) data file without reading it into memory (a compressed .npz
    member is decompressed, its first `samples` rows when given, up to NPZ_COMPRESSED_LIMIT bytes)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeadNeuronError(f"data file not found: {path}; expected a .npz with key 'x' (optional 'y') or a .npy")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".npz"):
        raise DeadNeuronError(
            f"unknown data format {suffix or '(no extension)'!r} for {path}; expected .npz (x, optional y) or .npy"
        )
    if os.path.isdir(path):
        raise DeadNeuronError(f"{path} is a folder; expected a .npz or .npy data file")
    from .filekind import check

    check(path, suffix, role="data")
    x: np.ndarray | dict[str, np.ndarray]
    try:
        if suffix == ".npy":
            _check_npy_size(path)
            x = np.load(path, mmap_mode="r", allow_pickle=False)
            y = None
        else:
            x, y = _npz_arrays(path, samples)
    except DeadNeuronError:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower() or "Python objects" in str(error):
            raise DeadNeuronError(
                f"{path} holds Python objects, which are refused (loading them could run code); save plain numeric "
                "arrays"
            ) from error
        raise DeadNeuronError(
            f"cannot read data file {path} (corrupt or truncated?): {first_line(error)}; expected a .npz (x, "
            "optional y) or .npy written by numpy.savez / numpy.save"
        ) from error
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, TypeError, RuntimeError, zlib.error) as error:
        raise DeadNeuronError(
            f"cannot read data file {path} (corrupt or truncated?): {first_line(error)}; expected a .npz (x, "
            "optional y) or .npy written by numpy.savez / numpy.save"
        ) from error
    return validate(Dataset(x=x, y=y, source=path))


def first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def validate(data: Dataset) -> Dataset:
    source = data.source
    named = data.x if isinstance(data.x, dict) else {"x": data.x}
    if not named:
        raise DeadNeuronError(f"{source}: no inputs; expected at least one array of inputs")
    length = None
    for name, array in named.items():
        _check_numeric(array, name, source)
        if array.ndim == 0 or array.shape[0] == 0:
            raise DeadNeuronError(
                f"{source}: the inputs are empty ({'' if array is data.x else name + ' has '}shape "
                f"{tuple(array.shape)}); expected at least one sample"
            )
        if length is not None and array.shape[0] != length:
            raise DeadNeuronError(
                f"{source}: {name} has {array.shape[0]} rows but {next(iter(named))} has {length}; expected one row "
                "per sample in every input"
            )
        length = array.shape[0]
    if data.y is not None:
        _check_numeric(data.y, "y", source)
        if data.y.ndim == 0 or data.y.shape[0] != length:
            raise DeadNeuronError(
                f"{source}: {data.y.shape[0] if data.y.ndim else 0} labels for {length} inputs; expected one "
                "label per input"
            )
    return data


def limit(data: Dataset, samples: int | None) -> Dataset:
    if samples is None or samples >= len(data):
        return data
    if samples <= 0:
        raise DeadNeuronError(f"--samples must be positive, received {samples}")
    y = None if data.y is None else data.y[:samples]
    return Dataset(x=rows(data.x, 0, samples), y=y, source=data.source)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop): the contiguous block of `n` samples that rank `rank` of `world` scans."""
    return n * rank // world, n * (rank + 1) // world


def shard(data: Dataset, rank: int, world: int) -> Dataset:
    """The contiguous slice of the samples that rank `rank` of `world` scans."""
    start, stop = shard_bounds(len(data), rank, world)
    y = None if data.y is None else data.y[start:stop]
    return Dataset(x=rows(data.x, start, stop), y=y, source=data.source)


def _file_region(array: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of array[0]) for a C-contiguous view of a memory map; None for anything else."""
    if not isinstance(array, np.memmap) or not array.filename or not array.flags.c_contiguous:
        return None
    root = array
    while isinstance(root.base, np.memmap):
        root = root.base
    if not isinstance(root.base, mmap.mmap):
        return None
    # the root memmap's first byte lies at file offset root.offset
    return str(array.filename), int(root.offset) + (array.ctypes.data - root.ctypes.data)


def array_batches(data: Dataset, batch_size: int) -> Iterator[tuple[Any, np.ndarray | None]]:
    """Batches as contiguous host arrays; a memory-mapped file is read one batch at a time.

    Inputs in a memory-mapped file are read with plain file reads rather than through the map: pages touched
    through a map count in the process's resident memory until the map closes, so peak RSS would grow with the
    file; read into a fresh buffer, it stays flat. Keyword inputs (a dict of arrays) are sliced key by key.
    """
    if batch_size <= 0:
        raise DeadNeuronError(f"batch size must be positive, received {batch_size}")
    if isinstance(data.x, dict):
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            named = {key: np.ascontiguousarray(value[start:stop]) for key, value in data.x.items()}
            yield named, None if data.y is None else np.ascontiguousarray(data.y[start:stop])
        return
    region = _file_region(data.x)
    handle = open(region[0], "rb") if region is not None else None  # noqa: SIM115 (closed in finally)
    try:
        row_bytes = data.x.dtype.itemsize * int(np.prod(data.x.shape[1:], dtype=np.int64))
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            if handle is not None and region is not None:
                x = np.empty((stop - start, *data.x.shape[1:]), dtype=data.x.dtype)
                handle.seek(region[1] + start * row_bytes)
                if handle.readinto(x.reshape(-1).view(np.uint8).data) != x.nbytes:
                    raise DeadNeuronError(f"{data.source} ended early (truncated file?)")
            else:
                x = np.ascontiguousarray(data.x[start:stop])
            y = None if data.y is None else np.ascontiguousarray(data.y[start:stop])
            yield x, y
    finally:
        if handle is not None:
            handle.close()


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(x, y) from one item of a user's iterable: a tensor, an (x, y[, ...]) pair (x may be a tuple of positional
    inputs), or a mapping (`split_mapping`: x/y keys, or keyword inputs and 'labels')."""
    if isinstance(batch, Mapping):
        return split_mapping(batch, "a batch")
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DeadNeuronError("a batch is empty; expected a tensor or an (x, y) pair")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def as_dataset(data: Any, labels: Any = None) -> Dataset | None:
    """A Dataset when `data` is a path, an array or an (array, array) pair; None for anything else."""
    if isinstance(data, (str, os.PathLike)):
        dataset = load_data_file(data)
        if labels is not None:
            dataset = validate(Dataset(dataset.x, np.asarray(labels), dataset.source))
        return dataset
    if isinstance(data, np.ndarray):
        return validate(Dataset(data, None if labels is None else np.asarray(labels)))
    if isinstance(data, Mapping):
        x, y = split_mapping(data, "the data")
        y = y if labels is None else labels
        arrays = list(x.values()) if isinstance(x, dict) else [x]
        if arrays and all(isinstance(a, np.ndarray) for a in arrays) and (y is None or isinstance(y, np.ndarray)):
            return validate(Dataset(dict(x) if isinstance(x, dict) else x, y))
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], np.ndarray)
        and (data[1] is None or isinstance(data[1], np.ndarray))
    ):
        return validate(Dataset(data[0], data[1] if labels is None else np.asarray(labels)))
    return None


def is_iterable_of_batches(data: Any) -> bool:
    return isinstance(data, Iterable) and not isinstance(data, (str, bytes, np.ndarray, tuple, Mapping))
