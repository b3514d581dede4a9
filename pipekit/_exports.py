"""Making re-exported names report their public module; checking an optional extra is installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, MutableMapping

__all__ = ["fixup_module_metadata", "require_extra"]


def require_extra(package: str, extra: str, modules: Iterable[str]) -> None:
    """Raise a one-line `ModuleNotFoundError` naming the extra to install if one of ``modules`` is missing.

    Args:
        package: The pipekit package that needs them (``pipekit.ci``).
        extra: The extra that installs them (``ci``).
        modules: The top-level modules it imports.
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules, say
            found = False
        if not found:
            raise ModuleNotFoundError(
                f"{package} needs the {extra!r} extra, which installs {module!r}: pip install 'pipekit[{extra}]'",
                name=module,
            )


def fixup_module_metadata(public: str, namespace: MutableMapping[str, object], names: Iterable[str]) -> None:
    """Set ``__module__`` of the re-exported ``names`` to ``public`` (``pipekit.X``, not ``pipekit._run.X``).

    Tracebacks, reprs and the API reference then show the path users import from.
    """
    private = f"{public}._"
    for name in names:
        obj = namespace[name]
        if getattr(obj, "__module__", "").startswith(private):
            try:
                obj.__module__ = public
            except (AttributeError, TypeError):  # pragma: no cover - builtins
                continue
