"""Finding what a command names: a pipeline file, a Python pipeline, request input values."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import attrs

import pipekit as pk

__all__ = ["LoadError", "LoadedPipeline", "load_definition", "load_pipeline", "parse_inputs"]

#: File name endings read as pipeline files (`pipekit.spec`).
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
#: The attribute a Python file named without ``:attribute`` must define.
DEFAULT_ATTRIBUTE = "pipeline"


class LoadError(pk.PipekitError, ValueError):
    """What the command was told to run cannot be loaded (a bad file, target or ``--input``).

    The message is one line per problem, fit to show as it is.
    """


@attrs.frozen(kw_only=True)
class LoadedPipeline:
    """A pipeline, and what it was loaded from.

    Attributes:
        pipeline: The pipeline.
        source: What names it again: the pipeline file or Python file (an
            absolute path), or ``module:attribute``.
        definition: The pipeline file's text, for pipeline files (None for
            Python pipelines).
        kind: ``"spec"`` for pipeline files, ``"python"`` for Python pipelines.
    """

    pipeline: pk.Pipeline
    source: str
    definition: str | None = attrs.field(default=None, repr=False)
    kind: Literal["spec", "python"]


def _spec_format(name: str, text: str) -> Literal["yaml", "json"]:
    if name.lower().endswith(".json"):
        return "json"
    if name.lower().endswith((".yaml", ".yml")):
        return "yaml"
    return "json" if text.lstrip().startswith("{") else "yaml"


def _load_spec(path: Path, target: str) -> LoadedPipeline:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(f"no such pipeline file: {target}") from None
    except IsADirectoryError:
        raise LoadError(f"{target} is a directory, not a pipeline file") from None
    except UnicodeDecodeError as exc:
        raise LoadError(f"{target}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise LoadError(f"cannot read {target}: {exc.strerror or exc}") from None
    return LoadedPipeline(
        pipeline=_from_text(text, format=_spec_format(target, text), source=target),
        source=str(path.resolve()),
        definition=text,
        kind="spec",
    )


def _from_text(text: str, *, format: Literal["yaml", "json"], source: str) -> pk.Pipeline:  # noqa: A002 - spec.loads's name
    from pipekit import spec  # noqa: PLC0415 - the spec layer (and PyYAML) is only needed for pipeline files

    try:
        return spec.loads(text, format=format, source=source)
    except spec.SpecError as exc:
        raise LoadError(str(exc)) from None
    except pk.PipekitError as exc:  # a definition the builder refuses (a cycle, say)
        raise LoadError(f"{source}: {_one_line(exc)}") from None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """Let ``directory``'s modules be imported, as ``python FILE`` / ``python -m`` would."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):  # the imported code removed it itself
                sys.path.remove(directory)


def _import_file(path: Path, target: str) -> object:
    if not path.is_file():
        raise LoadError(f"no such Python file: {target}")
    # A unique name, so loading the same file twice (run, then retry) runs it afresh.
    name = f"pipekit_cli_{path.stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise LoadError(f"cannot import {target}: not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        with _on_path(str(path.resolve().parent)):
            module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise LoadError(f"{target}:{exc.lineno}: invalid Python: {exc.msg}") from None
    except Exception as exc:
        raise LoadError(f"cannot import {target}: {_one_line(exc)}") from None
    finally:
        sys.modules.pop(name, None)
    return module


def _import_module(module_name: str, target: str) -> object:
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                raise LoadError(f"cannot import {target}: no module named {exc.name!r}") from None
            raise LoadError(f"cannot import {target}: {_one_line(exc)}") from None
        except SyntaxError as exc:
            raise LoadError(f"cannot import {target}: {exc.filename}:{exc.lineno}: invalid Python: {exc.msg}") from None
        except Exception as exc:
            raise LoadError(f"cannot import {target}: {_one_line(exc)}") from None


def _attribute(module: object, attribute: str, target: str) -> pk.Pipeline:
    value = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise LoadError(f"{target}: no attribute {attribute!r}") from None
    if isinstance(value, pk.Pipeline):
        return value
    if callable(value):
        try:
            made = value()
        except Exception as exc:
            raise LoadError(f"{target}: calling {attribute}() raised {_one_line(exc)}") from None
        if isinstance(made, pk.Pipeline):
            return made
        raise LoadError(f"{target}: {attribute}() returned {type(made).__name__}, not a pipekit.Pipeline")
    raise LoadError(f"{target}: {attribute} is {type(value).__name__}, not a pipekit.Pipeline")


def _load_python(target: str) -> LoadedPipeline:
    location, colon, attribute = target.rpartition(":")
    if not colon:
        location, attribute = target, DEFAULT_ATTRIBUTE
    if not location or not attribute:
        raise LoadError(f"cannot load {target!r}: expected FILE.py, FILE.py:attribute or module:attribute")
    if location.endswith(".py"):
        path = Path(location)
        module = _import_file(path, target)
        source = f"{path.resolve()}:{attribute}" if colon else str(path.resolve())
    else:
        if not all(part.isidentifier() for part in location.split(".")):
            raise LoadError(f"cannot load {target!r}: {location!r} is not a module name")
        module = _import_module(location, target)
        source = target
    return LoadedPipeline(pipeline=_attribute(module, attribute, target), source=source, kind="python")


def _checked(loaded: LoadedPipeline, target: str) -> LoadedPipeline:
    """``loaded``, once its definition is known to be sound (no unknown dependencies, no cycles)."""
    try:
        loaded.pipeline.check()
    except pk.PipekitError as exc:
        raise LoadError(f"{target}: {_one_line(exc)}") from None
    return loaded


def load_pipeline(target: str) -> LoadedPipeline:
    """Load the pipeline ``target`` names.

    ``target`` is a pipeline file (``.yaml``, ``.yml``, ``.json``, read by
    `pipekit.spec`), a Python file (``.py``) defining ``pipeline`` (or
    ``FILE.py:attribute``), or ``module:attribute`` (the module imported
    from the working directory or ``sys.path``). The attribute is a
    `pipekit.Pipeline`, or a callable taking no arguments that returns one.

    Args:
        target: What to load.

    Returns:
        The pipeline and where it came from.

    Raises:
        LoadError: If it cannot be loaded; the message says why (a pipeline
            file's problems one per line, each with file, line and field).
    """
    if target.lower().endswith(SPEC_SUFFIXES):
        return _checked(_load_spec(Path(target), target), target)
    if target.endswith(".py") or ":" in target:
        return _checked(_load_python(target), target)
    if Path(target).is_file():
        raise LoadError(f"cannot tell what {target} is: expected a .yaml, .yml, .json or .py file")
    raise LoadError(f"no such pipeline: {target} (expected a .yaml, .yml, .json or .py file, or module:attribute)")


def load_definition(definition: str | None, source: str, *, run_id: str) -> LoadedPipeline:
    """Load the pipeline of a recorded run again: from its recorded definition text, or else from ``source``.

    Args:
        definition: The pipeline file's text as recorded with the run, if any.
        source: Where a Python pipeline is loaded from (a ``.py`` file or
            ``module:attribute``); empty when unknown.
        run_id: The recorded run, for messages.

    Returns:
        The pipeline.

    Raises:
        LoadError: If neither gives a pipeline.
    """
    if definition is not None:
        where = f"run {run_id}"
        pipeline = _from_text(definition, format=_spec_format("", definition), source=where)
        return _checked(LoadedPipeline(pipeline=pipeline, source=source, definition=definition, kind="spec"), where)
    if not source:
        raise LoadError(
            f"run {run_id} was recorded without its pipeline's definition (a Python pipeline?); "
            "name the pipeline with --pipeline-from FILE.py or module:attribute"
        )
    return load_pipeline(source)


def parse_inputs(items: Iterable[str]) -> dict[str, str]:
    """Parse ``--input`` values: ``key=value``, or ``key=@file`` to read the value from a file.

    A file's text is taken as it is, less one trailing newline. ``key=@@x``
    is the literal value ``@x``.

    Args:
        items: The ``key=value`` strings, in order.

    Returns:
        The input, by key (values are strings).

    Raises:
        LoadError: For an item without ``=``, an empty or repeated key, or an
            unreadable file.
    """
    values: dict[str, str] = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise LoadError(f"--input {item!r}: expected key=value")
        if key in values:
            raise LoadError(f"--input {key!r} is given twice")
        if value.startswith("@@"):
            value = value[1:]
        elif value.startswith("@"):
            name = value[1:]
            try:
                value = Path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise LoadError(f"--input {key}=@{name}: cannot read {name}: {reason}") from None
            value = value.removesuffix("\n")
        values[key] = value
    return values
