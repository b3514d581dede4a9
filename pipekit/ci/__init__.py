"""pipekit.ci: shell commands as stages, language stages, pre-flight validators and hooks.

Needs the ``ci`` extra (``pip install 'pipekit[ci]'``).
"""

from __future__ import annotations

from pipekit._exports import fixup_module_metadata as _fixup

from ._command import CommandResult as CommandResult
from ._command import CommandStage as CommandStage
from ._errors import CommandError as CommandError
from ._errors import CommandFailedError as CommandFailedError
from ._errors import CommandNotFoundError as CommandNotFoundError
from ._events import OutputLine as OutputLine
from ._template import Secret as Secret

__all__ = (
    "CommandError",
    "CommandFailedError",
    "CommandNotFoundError",
    "CommandResult",
    "CommandStage",
    "OutputLine",
    "Secret",
)

_fixup(__name__, globals(), __all__)
del _fixup
