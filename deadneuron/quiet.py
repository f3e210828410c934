"""The command line's quiet: TensorFlow's start-up lines kept off stderr, Ctrl-C told in one line.

Used by `deadneuron.cli.main` only, and undone when it returns: a Python user's own process keeps its
environment, its import machinery, its stderr and its SIGINT handler as they were.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

# Environment the CLI sets for TensorFlow before it is imported (C++ logging, absl); put back afterwards.
TF_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "3"}
NOISY_MODULES = ("tensorflow",)


class Interrupted(BaseException):
    """Ctrl-C during a command. Not a KeyboardInterrupt, which click turns into a blank line and exit 1."""


@contextmanager
def cli_quiet(*, silence_imports: bool = True) -> Iterator[None]:
    """While a CLI command runs: TensorFlow imported with its C++ start-up lines silenced (unless
    `silence_imports` is False, as under --debug), its loggers at ERROR, and SIGINT raising `Interrupted`."""
    import logging

    saved_env = {key: os.environ.get(key) for key in TF_ENVIRONMENT}
    for key, value in TF_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    finder = _QuietFinder(NOISY_MODULES if silence_imports else ())
    sys.meta_path.insert(0, finder)
    # An ignored SIGINT (a background job) stays ignored; any handler is put back when the command ends.
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
        signal.SIG_IGN,
        signal.SIG_DFL,
        None,
    )
    previous = signal.signal(signal.SIGINT, _raise_interrupted) if ours else None
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for key, saved in saved_env.items():
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: silences what C++ libraries print while they load."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds `names` with the other finders and runs their first import with stderr silenced."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names or fullname in sys.modules:
            return None
        self.names.discard(fullname)  # once; also keeps the search below from finding us again
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with stderr_silenced():
            self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
