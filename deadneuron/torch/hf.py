"""Loading a saved Hugging Face transformers directory (`save_pretrained`) without running code from it.

What is read, and how:
- `config.json` (at most `CONFIG_LIMIT` bytes) as plain JSON. A config with `auto_map` names Python code shipped
  with the model ("remote code"); it is refused, and `trust_remote_code` is never passed anywhere.
- The model class is the one named in `architectures`, looked up in transformers' own namespace (a
  `PreTrainedModel` subclass that ships with the installed transformers), and the config class is transformers'
  own for the config's `model_type`. The weights are read from `model.safetensors` or the shards named by
  `model.safetensors.index.json` with `safetensors` (no pickle), then handed to transformers' own
  `from_pretrained(None, config=..., state_dict=...)`, which builds the model and applies the key renames of
  its checkpoint conversion mapping (transformers 5 saves ViT's `encoder.layer.0.attention.attention.query` and
  loads it as `layers.0.attention.q_proj`); no file is read by transformers. `pytorch_model.bin` and other
  pickled weights are refused.
- Before transformers builds anything: no `*_implementation` setting may name a Hub kernel (`org/repo`), and the
  model built on the meta device may register only so many modules, parameters and buffers per saved tensor and
  take at most twice the weights' bytes (plus UNSAVED_ALLOWANCE): a 2 kB config cannot ask for all the memory.
- transformers is an optional extra (`pip install 'deadneuron[hf]'`); without it the error says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..data import first_line
from ..errors import DeadNeuronError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG_LIMIT = 1 << 20  # bytes; real configs are a few kB
INSTALL_HINT = "install it with: pip install 'deadneuron[hf]'"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def is_transformers_dir(path: str | os.PathLike[str]) -> bool:
    """A folder holding a `config.json`: what `save_pretrained` writes (the rest is checked on loading)."""
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise DeadNeuronError(
            f"loading a transformers model directory needs the transformers package, which is not installed; "
            f"{INSTALL_HINT}"
        ) from error
    return transformers


def read_config(path: str) -> dict[str, Any]:
    """`config.json` of the directory `path` as a dict, checked for remote code and for a known architecture."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise DeadNeuronError(
            f"{path} is a folder without {CONFIG}; expected a transformers model directory written by "
            "model.save_pretrained(path) (config.json and model.safetensors)"
        )
    size = os.path.getsize(file)
    if size > CONFIG_LIMIT:
        raise DeadNeuronError(
            f"{file} is {size} bytes; expected a transformers config of at most {CONFIG_LIMIT} bytes"
        )
    try:
        with open(file, "rb") as handle:
            config = json.loads(handle.read(CONFIG_LIMIT + 1).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DeadNeuronError(
            f"{file} is not valid JSON ({first_line(error)}); expected the config.json written by save_pretrained"
        ) from error
    if not isinstance(config, dict):
        raise DeadNeuronError(
            f"{file} holds a JSON {type(config).__name__}; expected an object (a transformers config)"
        )
    if "auto_map" in config:
        raise DeadNeuronError(
            f"{file} has an auto_map: the model needs Python code shipped with it (remote code), which deadneuron "
            "never runs; load it yourself with trust_remote_code=True if you trust it, and pass the model to "
            "deadneuron.scan in Python"
        )
    kernel = _hub_kernel(config)
    if kernel:
        raise DeadNeuronError(
            f"{file} sets {kernel[0]} to {kernel[1][:80]!r}, a kernel that transformers would download from the "
            "Hugging Face Hub and run (code not shipped with transformers), which deadneuron never runs; expected a "
            "built-in implementation (eager, sdpa); remove the key or set it to 'eager'"
        )
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or len(architectures) != 1
        or not isinstance(architectures[0], str)
        or not isinstance(config.get("model_type"), str)
    ):
        raise DeadNeuronError(
            f"{file} does not name one model class and a model type (architectures={architectures!r}, "
            f"model_type={config.get('model_type')!r}); expected a config written by model.save_pretrained"
        )
    return config


def _hub_kernel(config: Any, where: str = "") -> tuple[str, str] | None:
    """(key, value) of an `*_implementation` setting (attn_implementation, experts_implementation, in nested
    configs too) that is more than a built-in name: transformers reads `org/repo` as a Hub kernel to download and
    load; None when there is none."""
    for key, value in config.items():
        if key.endswith("_implementation"):
            for sub, name in value.items() if isinstance(value, dict) else [("", value)]:
                if name is not None and not (isinstance(name, str) and re.fullmatch(r"[a-z0-9_]+", name)):
                    return where + key + (f"[{sub!r}]" if sub else ""), str(name)
        elif isinstance(value, dict) and (found := _hub_kernel(value, f"{where}{key}.")):
            return found
    return None


def _model_class(transformers: Any, config: dict[str, Any], file: str) -> Any:
    name = config["architectures"][0]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    base = transformers.PreTrainedModel
    if not (isinstance(cls, type) and issubclass(cls, base) and cls.__module__.startswith("transformers.")):
        raise DeadNeuronError(
            f"{file} names the model class {name!r}, which transformers {transformers.__version__} does not "
            "ship; expected a transformers model class (upgrade transformers, or build the model in Python and "
            "pass it to deadneuron.scan)"
        )
    return cls


def _config_object(transformers: Any, config: dict[str, Any], file: str) -> Any:
    CONFIG_MAPPING = transformers.CONFIG_MAPPING
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise DeadNeuronError(
            f"{file} has model_type {model_type!r}, which transformers {transformers.__version__} does not know; "
            "expected a model type of the installed transformers (upgrade it)"
        )
    return CONFIG_MAPPING[model_type].from_dict(config)


def _weight_files(path: str) -> list[str]:
    single = os.path.join(path, WEIGHTS)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        if os.path.getsize(index) > 16 * CONFIG_LIMIT:
            raise DeadNeuronError(f"{index} is too large for a shard index; expected a file written by save_pretrained")
        try:
            with open(index, "rb") as handle:
                weight_map = json.loads(handle.read().decode("utf-8")).get("weight_map")
        except (ValueError, UnicodeDecodeError, AttributeError) as error:
            raise DeadNeuronError(f"{index} is not a shard index ({first_line(error)})") from error
        if not isinstance(weight_map, dict) or not weight_map:
            raise DeadNeuronError(f"{index} has no weight_map; expected a file written by save_pretrained")
        shards = sorted({str(name) for name in weight_map.values()})
        for shard in shards:
            # Shards are plain file names beside the index: no folders, no way out of the directory.
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise DeadNeuronError(
                    f"{index} names the shard {shard!r}; expected .safetensors file names inside {path}"
                )
            if not os.path.isfile(os.path.join(path, shard)):
                raise DeadNeuronError(f"{index} names the shard {shard}, which is missing from {path}")
        return [os.path.join(path, shard) for shard in shards]
    pickled = [name for name in _PICKLED if os.path.exists(os.path.join(path, name))]
    if pickled:
        raise DeadNeuronError(
            f"{path} holds its weights in {pickled[0]}, which is refused (pickle can run code, other formats are "
            f"not PyTorch); expected {WEIGHTS}: re-save with model.save_pretrained(path, safe_serialization=True)"
        )
    raise DeadNeuronError(
        f"{path} has a {CONFIG} but no weights; expected {WEIGHTS} or {INDEX} beside it (model.save_pretrained)"
    )


def load_pretrained(path: str | os.PathLike[str]) -> nn.Module:
    """The model saved in the transformers directory `path`, in eval mode, with no code from `path` run."""
    path = os.fspath(path)
    config = read_config(path)
    files = _weight_files(path)
    transformers = _transformers()
    file = os.path.join(path, CONFIG)
    cls = _model_class(transformers, config, file)
    try:
        with _transformers_quiet(transformers):  # its config checks log warnings (a bos id past the vocabulary)
            config_object = _config_object(transformers, config, file)
    except DeadNeuronError:
        raise
    except Exception as error:  # a config whose values this transformers cannot build
        raise _unbuildable(transformers, cls, file, error) from error
    _check_size(cls, config_object, files, file)
    state = _read_weights(files)
    try:
        with _transformers_quiet(transformers):
            model, info = cls.from_pretrained(None, config=config_object, state_dict=state, output_loading_info=True)
    except RuntimeError as error:  # shape mismatches (ignore_mismatched_sizes is off)
        raise DeadNeuronError(
            f"the weights in {path} do not fit its config: {first_line(error)}; expected weights saved with "
            "this config.json"
        ) from error
    except Exception as error:
        raise _unbuildable(transformers, cls, file, error) from error
    tied = _tied_names(model, set(state))
    missing = sorted(name for name in info.get("missing_keys", ()) if name not in tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    if missing or unexpected:
        what = f"missing {_few(missing)}" if missing else f"unexpected {_few(unexpected)}"
        raise DeadNeuronError(
            f"the weights in {path} do not match {type(model).__name__} ({what}); expected weights saved by "
            "save_pretrained from the class named in config.json"
        )
    model.eval()
    return model  # type: ignore[no-any-return]


# safetensors refuses headers beyond this itself; a header is read whole, so it is capped before reading
HEADER_LIMIT = 100 << 20
# a model's own tensors that are not saved (rotary frequencies, causal masks) may add this much to its weights
UNSAVED_ALLOWANCE = 256 << 20


def _tensor_count(files: list[str]) -> int:
    """How many tensors the safetensors `files` hold, read from their headers (8-byte length, then JSON)."""
    count = 0
    for name in files:
        with open(name, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > min(HEADER_LIMIT, os.path.getsize(name)):
                raise DeadNeuronError(
                    f"cannot read {name} as safetensors: its header claims {length:,} bytes, more than the file "
                    "holds or safetensors allows; expected the weights written by save_pretrained"
                )
            try:
                header = json.loads(handle.read(length))
            except (ValueError, UnicodeDecodeError, RecursionError) as error:
                raise DeadNeuronError(f"cannot read {name} as safetensors: its header is not JSON") from error
        count += len(header) - ("__metadata__" in header) if isinstance(header, dict) else 0
    return count


# A model registers a few modules, parameters and buffers per saved tensor (activations, dropouts and norms hold
# none); a count far beyond is a config that multiplies blocks (xLSTM's num_blocks, an expert count) for nothing.
OBJECTS_PER_TENSOR = 16
OBJECTS_ALLOWANCE = 10_000


class _TooMany(Exception):
    """More modules, parameters and buffers registered than the budget: raised from torch's registration hooks."""


class _Counter:
    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def __call__(self, *args: Any) -> None:
        self.count += 1
        if self.count > self.limit:
            raise _TooMany


@contextmanager
def _registrations(limit: int) -> Iterator[_Counter]:
    """While building a model: every module, parameter and buffer registered anywhere is counted, and the build
    stops (`_TooMany`) past `limit`, before the objects of a crafted config fill the memory."""
    from torch.nn.modules import module

    counter = _Counter(limit)
    handles = [
        module.register_module_module_registration_hook(counter),
        module.register_module_parameter_registration_hook(counter),
        module.register_module_buffer_registration_hook(counter),
    ]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def _check_size(cls: Any, config_object: Any, files: list[str], file: str) -> None:
    """Refuse a config that describes a model far larger than its weights, before building it: transformers
    allocates and initializes every tensor the config describes, so a 2 kB config.json could take all memory.

    The model is built first on the meta device (shapes only), counting the modules, parameters and buffers it
    registers (a million blocks would take gigabytes of Python objects even without tensors: at most
    OBJECTS_PER_TENSOR per saved tensor); its tensors may take at most twice the weights' bytes on disk plus
    UNSAVED_ALLOWANCE."""
    tensors = _tensor_count(files)
    try:
        with torch.device("meta"), _registrations(OBJECTS_PER_TENSOR * tensors + OBJECTS_ALLOWANCE) as counted:
            shapes = cls(config_object)
    except _TooMany as error:
        raise DeadNeuronError(
            f"{file} describes a model of more than {counted.limit:,} modules, parameters and buffers, but its "
            f"weights hold {tensors:,} tensors; refused (building it would exhaust memory); expected the "
            "config.json saved with these weights"
        ) from error
    except Exception:  # the real build below says what is wrong with the config
        return
    needed = sum(t.numel() * t.element_size() for t in (*shapes.parameters(), *shapes.buffers()))
    stored = sum(os.path.getsize(name) for name in files)
    if needed > 2 * stored + UNSAVED_ALLOWANCE:
        raise DeadNeuronError(
            f"{file} describes a model of {needed:,} bytes, but its weights hold {stored:,}; refused (building it "
            "would exhaust memory); expected the config.json saved with these weights"
        )


def _unbuildable(transformers: Any, cls: Any, file: str, error: Exception) -> DeadNeuronError:
    return DeadNeuronError(
        f"transformers could not build {cls.__name__} from {file}: {first_line(error)}; expected a config "
        f"written by the installed transformers {transformers.__version__} or a compatible one"
    )


def _read_weights(files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as error:
            raise DeadNeuronError(
                f"cannot read {file} as safetensors (corrupt or truncated?): {first_line(error)}; expected the "
                "weights written by save_pretrained"
            ) from error
    return state


@contextmanager
def _transformers_quiet(transformers: Any) -> Iterator[None]:
    """transformers' config warnings, loading report and progress bar kept off stderr (deadneuron names what is
    missing itself, and a user error is one line); its verbosity and progress-bar switch put back afterwards."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _tied_names(model: nn.Module, loaded: set[str]) -> set[str]:
    """Parameter names that share their tensor with a loaded one (tied embeddings: saved once)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied: set[str] = set()
    for names in by_tensor.values():
        if len(names) > 1 and loaded.intersection(names):
            tied.update(names)
    return tied


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
