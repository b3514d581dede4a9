"""pipekit.ci: shell commands as stages, language stages, pre-flight validators and hooks.

Needs the ``ci`` extra (``pip install 'pipekit[ci]'``).
"""

from __future__ import annotations

from pipekit._exports import fixup_module_metadata as _fixup
from pipekit._exports import require_extra as _require_extra

_require_extra("pipekit.ci", "ci", ("httpx", "packaging"))

from ._command import CommandResult as CommandResult
from ._command import CommandStage as CommandStage
from ._errors import CommandError as CommandError
from ._errors import CommandFailedError as CommandFailedError
from ._errors import CommandNotFoundError as CommandNotFoundError
from ._events import OutputLine as OutputLine
from ._hooks import HookDeliveryError as HookDeliveryError
from ._hooks import HookStatistics as HookStatistics
from ._hooks import HttpHook as HttpHook
from ._hooks import PrintHook as PrintHook
from ._hooks import SlackHook as SlackHook
from ._hooks import event_matches as event_matches
from ._hooks import event_names as event_names
from ._hooks import event_to_dict as event_to_dict
from ._languages import CargoBuildStage as CargoBuildStage
from ._languages import CargoTestStage as CargoTestStage
from ._languages import CommandOptions as CommandOptions
from ._languages import DockerBuildStage as DockerBuildStage
from ._languages import GoBuildStage as GoBuildStage
from ._languages import GoModDownloadStage as GoModDownloadStage
from ._languages import GoTestStage as GoTestStage
from ._languages import NpmBuildStage as NpmBuildStage
from ._languages import NpmInstallStage as NpmInstallStage
from ._languages import PipInstallStage as PipInstallStage
from ._languages import PytestStage as PytestStage
from ._template import Secret as Secret
from ._validators import EnvVarValidator as EnvVarValidator
from ._validators import Tool as Tool
from ._validators import ToolValidator as ToolValidator

__all__ = (
    "CargoBuildStage",
    "CargoTestStage",
    "CommandError",
    "CommandFailedError",
    "CommandNotFoundError",
    "CommandOptions",
    "CommandResult",
    "CommandStage",
    "DockerBuildStage",
    "EnvVarValidator",
    "GoBuildStage",
    "GoModDownloadStage",
    "GoTestStage",
    "HookDeliveryError",
    "HookStatistics",
    "HttpHook",
    "NpmBuildStage",
    "NpmInstallStage",
    "OutputLine",
    "PipInstallStage",
    "PrintHook",
    "PytestStage",
    "Secret",
    "SlackHook",
    "Tool",
    "ToolValidator",
    "event_matches",
    "event_names",
    "event_to_dict",
)

_fixup(__name__, globals(), __all__)
del _fixup, _require_extra
