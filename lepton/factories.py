"""User factories (``package.module:factory`` or ``path/to/file.py:factory``): how a job names
them, importing them, and calling them with the facts they ask for. Free of torch, so that the
command line can normalise a name before any heavy import."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from lepton.errors import ConfigError

# A factory with this attribute set to True receives every fact Lepton offers it (a model:
# input_dim, output_dim, num_classes for class ids, vocab_size for token ids; a dataset: seed)
# even through **kwargs; without it, only those its signature names explicitly.
ALL_FACTS_ATTRIBUTE = "lepton_all_facts"

log = structlog.get_logger("lepton.workloads")


def is_file_factory(spec: str) -> bool:
    """Whether ``spec`` names a factory in a Python file (``path/to/file.py:factory``)."""
    return spec.partition(":")[0].endswith(".py")


FILE_DATASET_KINDS = ("parquet", "npy")  # built-in file-backed data sets: KIND:DIR


def is_file_dataset(spec: str) -> bool:
    """Whether ``spec`` names a built-in file-backed data set (``parquet:DIR``, ``npy:DIR``)."""
    return spec.partition(":")[0] in FILE_DATASET_KINDS


def absolute_file_dataset(spec: str) -> str:
    """``parquet:DIR`` or ``npy:DIR`` with DIR made absolute; any other spec unchanged."""
    if not is_file_dataset(spec):
        return spec
    kind, _, where = spec.partition(":")
    return f"{kind}:{Path(where).expanduser().resolve()}"


def absolute_factory(spec: str) -> str:
    """``spec`` with a file path made absolute (so that processes started elsewhere find the same
    file); any other spec unchanged."""
    if not is_file_factory(spec):
        return spec
    path, _, attr = spec.partition(":")
    return f"{Path(path).expanduser().resolve()}:{attr}"


def _import_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"no file {path} for {spec!r}")
    # One module per file, named after its path, so two files called models.py do not collide
    # and a second resolve of the same file reuses the first import.
    name = f"lepton_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import {path} for {spec!r}: not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is a config error
        del sys.modules[name]
        log.error("factory_import_failed", factory=spec, exc_info=True)
        raise ConfigError(f"importing {path} for {spec!r} raised {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = Path.cwd()
        # Console scripts do not put the current directory on sys.path (``python -m`` does):
        # look there for the module a user names from where they stand.
        here = (cwd / f"{top}.py").is_file() or (cwd / top).is_dir()
        if exc.name != top or not here or str(cwd) in sys.path:
            raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
        sys.path.append(str(cwd))
        importlib.invalidate_caches()
        return _import_module(module_name, spec)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is a config error
        log.error("factory_import_failed", factory=spec, exc_info=True)
        raise ConfigError(f"importing {module_name!r} for {spec!r} raised {type(exc).__name__}: {exc}") from exc


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Imports ``package.module:attribute`` (from sys.path, else from the current directory) or
    ``path/to/file.py:attribute``. Raises ConfigError with what went wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"{spec!r} is neither a built-in name nor 'package.module:factory' or 'path/to/file.py:factory'"
        )
    module = _import_file(module_name, spec) if is_file_factory(spec) else _import_module(module_name, spec)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None


def call_with_known_kwargs(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Calls factory ``fn`` with the subset of ``kwargs`` its signature names explicitly (all of
    them if it opts in with ``ALL_FACTS_ATTRIBUTE``: a ``**kwargs`` that forwards to a class,
    torchvision style, would otherwise pass on names the class does not take). Raises ConfigError
    naming the exception if the factory raises (the traceback goes to the log)."""
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if getattr(fn, ALL_FACTS_ATTRIBUTE, False) is True:
        chosen = kwargs
    else:
        named = {
            n
            for n, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        chosen = {k: v for k, v in kwargs.items() if k in named}
    try:
        return fn(**chosen)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a factory that raises refuses the job, in its words
        log.error("factory_failed", factory=what, exc_info=True)
        raise ConfigError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def unknown(what: str, name: str, builtins: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"unknown {what} {name!r}: built-in ones are {', '.join(builtins)}; or name a factory as "
        "package.module:factory or path/to/file.py:factory"
    )
