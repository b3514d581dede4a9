"""Making re-exported names report their public module."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

__all__ = ["fixup_module_metadata"]


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
