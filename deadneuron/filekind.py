"""What a file is, told by its content (magic bytes, zip layout), before any framework is imported.

A file named `.pt2` that is a Keras archive, random bytes named `.npz`, a 5-byte `.keras`: each is told in one
line, in milliseconds, without importing torch or TensorFlow. Only the first bytes and, for zips, the central
directory are read (the directory is at most the file's own size).
"""

from __future__ import annotations

import os
import zipfile

from .archive import ZIP_ERRORS, check_directory
from .errors import DeadNeuronError

# kind -> how a message names it, and the suffix it should have
KINDS = {
    "pt2": ("a torch.export archive", ".pt2"),
    "torch": ("a torch.save file", ".pt"),
    "torchscript": ("a TorchScript archive", ".pt"),
    "keras": ("a Keras archive", ".keras"),
    "hdf5": ("an HDF5 file (Keras .h5)", ".h5"),
    "npz": ("a numpy .npz archive", ".npz"),
    "npy": ("a numpy .npy array", ".npy"),
    "safetensors": ("a safetensors file", ".safetensors"),
    "pickle": ("a pickle (legacy torch.save)", ".pt"),
    "zip": ("a zip archive of another kind", ""),
    "damaged zip": ("a damaged or truncated zip archive", ""),
    "empty": ("an empty file", ""),
    "unknown": ("not a known model or data format", ""),
}
# what each suffix may hold
ACCEPTS = {
    ".pt2": {"pt2", "damaged zip"},
    ".pt": {"torch", "torchscript", "pickle", "damaged zip", "unknown", "empty"},
    ".keras": {"keras"},
    ".h5": {"hdf5"},
    ".npz": {"npz", "damaged zip"},
    ".npy": {"npy", "empty", "unknown"},
    ".safetensors": {"safetensors", "unknown", "empty"},
}
for _suffix in (".pth", ".bin", ".ckpt"):
    ACCEPTS[_suffix] = ACCEPTS[".pt"]
ACCEPTS[".hdf5"] = ACCEPTS[".h5"]


def sniff(path: str) -> str:
    """The kind of the file at `path`: a key of KINDS."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return _zip_kind(path)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    if head[0] == 0x80 and 1 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _zip_kind(path: str) -> str:
    try:
        check_directory(path, what=path, expected="a model or data file of a few thousand members at most")
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except ZIP_ERRORS:
        return "damaged zip"
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "models/model.json" in tails or "archive_format" in tails:
        return "pt2"
    if any(t.startswith("code/") or t.endswith("constants.pkl") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch"
    if "config.json" in names and ("model.weights.h5" in names or "metadata.json" in names):
        return "keras"
    if names and all(name.endswith(".npy") for name in names):
        return "npz"
    return "zip"


def check(path: str, suffix: str, role: str = "model") -> str:
    """The file's kind; DeadNeuronError when its content is not what `suffix` promises (checked before any
    framework is imported, so a mistake is told in milliseconds). `role` is "model" or "data"."""
    suffix = suffix.lower()
    kind = sniff(path)
    allowed = ACCEPTS.get(suffix)
    if allowed is None or kind in allowed:
        return kind
    expected = KINDS[_expected_kind(suffix)][0]
    found, right_suffix = KINDS[kind]
    if kind == "damaged zip" and suffix == ".keras":  # the words Keras' own loader would end in, without TF
        raise DeadNeuronError(
            f"cannot load {path}: the file is damaged or not a Keras model (not a readable zip archive); expected "
            "a .keras zip archive written by model.save. Check that the file was copied completely, or save the "
            "model again"
        )
    if kind in ("empty", "unknown", "damaged zip", "zip"):
        raise DeadNeuronError(
            f"{path} is not {expected}: it is {found}; check that the file was copied completely, or save it again"
        )
    other_role = "data" if kind in ("npz", "npy") else "model"
    note = f" (a {other_role} file, not a {role} file)" if other_role != role else ""
    raise DeadNeuronError(
        f"{path} is {found}{note}, not {expected} as its name says; rename it to end in {right_suffix}"
        + (" and pass it as --data" if other_role == "data" and role == "model" else "")
    )


def _expected_kind(suffix: str) -> str:
    kinds = {".pt2": "pt2", ".keras": "keras", ".h5": "hdf5", ".hdf5": "hdf5", ".npz": "npz", ".npy": "npy"}
    return kinds.get(suffix, "safetensors" if suffix == ".safetensors" else "torch")
