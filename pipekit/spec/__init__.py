"""Declarative pipeline files: YAML or JSON in, a [`Pipeline`][pipekit.Pipeline] out.

``pipekit.spec.load("pipeline.yaml")`` returns an ordinary pipeline of
[`CommandStage`][pipekit.ci.CommandStage]s (and `StepsStage`s,
`CheckoutStage`), so everything the core does works unchanged. A file is
decoded into the typed model (`PipelineSpec` and friends) and checked; every
problem is a [`SpecError`][pipekit.spec.SpecError] naming the file, line and
field (``pipeline.yaml:12: stages[2].timeout: expected a number of seconds,
got "ten"``). `json_schema` is the format's JSON Schema, shipped as
``pipekit/spec/pipeline.schema.json`` for editors. See ``docs/spec.md``.
"""

from __future__ import annotations

from pipekit._exports import fixup_module_metadata as _fixup
from pipekit._exports import require_extra as _require_extra

_require_extra("pipekit.spec", "cli", ("yaml", "msgspec", "httpx", "packaging"))

from ._build import build as build
from ._build import load as load
from ._build import loads as loads
from ._build import parse as parse
from ._errors import SpecError as SpecError
from ._model import EnvValueSpec as EnvValueSpec
from ._model import PipelineSpec as PipelineSpec
from ._model import RetrySpec as RetrySpec
from ._model import StageSpec as StageSpec
from ._model import StepSpec as StepSpec
from ._model import ToolSpec as ToolSpec
from ._model import ValidatorsSpec as ValidatorsSpec
from ._schema import json_schema as json_schema
from ._stages import CheckoutStage as CheckoutStage
from ._stages import StepsStage as StepsStage

__all__ = (
    "CheckoutStage",
    "EnvValueSpec",
    "PipelineSpec",
    "RetrySpec",
    "SpecError",
    "StageSpec",
    "StepSpec",
    "StepsStage",
    "ToolSpec",
    "ValidatorsSpec",
    "build",
    "json_schema",
    "load",
    "loads",
    "parse",
)


_fixup(__name__, globals(), __all__)
del _fixup, _require_extra
