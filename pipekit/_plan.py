"""Compiling a pipeline's entries into a dependency graph (the plan).

The plan is computed once per pipeline value and shared by all its runs; the
runner keeps all per-run state itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import PipelineDefinitionError
from ._instrument import ATTR_PIPELINE, ATTR_STAGE, AttributeCache, NodeAttributes
from ._stage import RollbackFunction, ValidateFunction, find_rollback, find_validate

if TYPE_CHECKING:
    from ._context import StageContext
    from ._pipeline import Pipeline
    from ._policy import RetryPolicy
    from ._stage import Stage

__all__ = ["Entry", "Node", "Plan", "compile_plan", "find_cycle"]

Condition = Callable[["StageContext"], bool]


@attrs.frozen(kw_only=True)
class Entry:
    """One stage as added to a pipeline, with its policies.

    ``group`` numbers the builder call that added it: the stages of one
    ``add_parallel_stages`` call share it; ``depends_on=None`` means "everything
    in the previous group".
    """

    stage: Stage
    group: int
    retry: RetryPolicy | None = None
    timeout: float | None = None
    depends_on: tuple[str, ...] | None = None
    continue_on_error: bool = False
    when: Condition | None = None
    limit: int | None = None

    @property
    def name(self) -> str:
        return self.stage.name


class Node:
    """A stage in the compiled graph, with everything the runner needs resolved."""

    __slots__ = (
        "continue_on_error",
        "dependents",
        "deps",
        "direct",
        "explicit_deps",
        "group",
        "index",
        "limit",
        "name",
        "nested",
        "retry",
        "rollback",
        "stage",
        "telemetry",
        "timeout",
        "validate",
        "when",
    )

    def __init__(self, index: int, entry: Entry, retry: RetryPolicy | None, timeout: float | None) -> None:
        from ._pipeline import Pipeline  # noqa: PLC0415 - cycle: pipelines hold plans

        stage = entry.stage
        self.index = index
        self.name: str = stage.name
        self.stage: Any = stage
        self.retry = retry
        self.timeout = timeout
        self.when = entry.when
        self.continue_on_error = entry.continue_on_error
        self.group = entry.group
        self.limit = entry.limit
        self.explicit_deps = entry.depends_on is not None
        self.nested: Pipeline | None = stage if isinstance(stage, Pipeline) else None
        # No policy and no nesting: the runner awaits execute() directly.
        self.direct = retry is None and timeout is None and self.nested is None
        # A nested pipeline validates each inner stage itself, right before it
        # runs; only dry runs validate it as a whole (see _run._validate_node).
        self.validate: ValidateFunction | None = None if self.nested is not None else find_validate(stage)
        self.rollback: RollbackFunction | None = None if self.nested is not None else find_rollback(stage)
        self.deps: tuple[int, ...] = ()
        self.dependents: tuple[int, ...] = ()
        self.telemetry = NodeAttributes({ATTR_PIPELINE: "", ATTR_STAGE: self.name})

    @property
    def compensable(self) -> bool:
        if self.nested is not None:
            return self.nested.rollback_enabled
        return self.rollback is not None

    def __repr__(self) -> str:
        return f"<Node {self.name!r}>"


class Plan:
    """The compiled graph of one pipeline value."""

    __slots__ = ("index", "nodes", "order", "preflight", "roots", "telemetry")

    def __init__(
        self, nodes: Sequence[Node], order: Sequence[int], pipeline_name: str = "", *, validators: bool = False
    ) -> None:
        self.nodes: tuple[Node, ...] = tuple(nodes)
        # Whether this pipeline or one nested in it has pre-flight validators
        # (decided once here, not walked again by every run).
        self.preflight: bool = validators or any(n.nested is not None and n.nested.plan().preflight for n in self.nodes)
        self.order: tuple[int, ...] = tuple(order)
        self.index: dict[str, int] = {n.name: n.index for n in nodes}
        self.roots: tuple[int, ...] = tuple(n.index for n in nodes if not n.deps)
        self.telemetry = AttributeCache({ATTR_PIPELINE: pipeline_name})
        for node in self.nodes:
            # Only stages placed in a graph explicitly (depends_on=...) name their
            # dependencies on their span; a plain chain needs no attribute for it.
            depends_on = [self.nodes[d].name for d in node.deps] if node.explicit_deps else []
            node.telemetry = NodeAttributes({ATTR_PIPELINE: pipeline_name, ATTR_STAGE: node.name}, depends_on)

    def depends(self, later: int, earlier: int) -> bool:
        """Whether ``later`` (transitively) depends on ``earlier``."""
        nodes = self.nodes
        seen: set[int] = set()
        stack = list(nodes[later].deps)
        while stack:
            j = stack.pop()
            if j == earlier:
                return True
            if j not in seen:
                seen.add(j)
                stack.extend(nodes[j].deps)
        return False

    def concurrent(self, a: str, b: str) -> bool:
        """Whether stages ``a`` and ``b`` may run at the same time (no path between them)."""
        ia, ib = self.index.get(a), self.index.get(b)
        if ia is None or ib is None:
            return False
        return not (self.depends(ia, ib) or self.depends(ib, ia))


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """Return one dependency cycle as a list of names (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in deps:
        if state.get(start):
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            name, k = stack.pop()
            if k == 0:
                state[name] = 1
                path.append(name)
            children = [d for d in deps.get(name, ()) if d in deps]
            if k < len(children):
                stack.append((name, k + 1))
                child = children[k]
                if state.get(child) == 1:
                    return [*path[path.index(child) :], child]
                if not state.get(child):
                    stack.append((child, 0))
            else:
                state[name] = 2
                path.pop()
    return None


def resolve_dependencies(entries: Sequence[Entry]) -> dict[str, tuple[str, ...]]:
    """Map each stage name to the names it depends on (defaults resolved)."""
    members: dict[int, list[str]] = {}
    for e in entries:
        members.setdefault(e.group, []).append(e.name)
    groups = sorted(members)
    previous: dict[int, tuple[str, ...]] = {}
    for k, g in enumerate(groups):
        previous[g] = tuple(members[groups[k - 1]]) if k else ()
    return {e.name: (e.depends_on if e.depends_on is not None else previous[e.group]) for e in entries}


def compile_plan(pipeline: Pipeline, *, lenient: bool = False) -> Plan:
    """Resolve dependencies, reject unknown names and cycles, and build the graph.

    With ``lenient`` (dry runs of a broken definition), unknown dependencies
    are dropped and a cycle makes every stage a root, so each stage can still
    be validated.

    Raises:
        PipelineDefinitionError: Naming every unknown dependency, or a cycle.
    """
    entries = pipeline.entries
    deps = resolve_dependencies(entries)
    problems = [
        f"stage {name!r} depends on unknown stage {d!r}" for name, ds in deps.items() for d in ds if d not in deps
    ]
    if problems:
        if not lenient:
            raise PipelineDefinitionError(f"pipeline {pipeline.name!r}: " + "; ".join(problems))
        deps = {name: tuple(d for d in ds if d in deps) for name, ds in deps.items()}
    cycle = find_cycle(deps)
    if cycle is not None:
        if not lenient:
            raise PipelineDefinitionError(f"pipeline {pipeline.name!r} has a dependency cycle: {' -> '.join(cycle)}")
        deps = dict.fromkeys(deps, ())
    nodes = [
        Node(
            i,
            e,
            e.retry if e.retry is not None else pipeline.retry,
            e.timeout if e.timeout is not None else pipeline.stage_timeout,
        )
        for i, e in enumerate(entries)
    ]
    index = {n.name: n.index for n in nodes}
    dependents: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        node.deps = tuple(index[d] for d in dict.fromkeys(deps[node.name]))
        for d in node.deps:
            dependents[d].append(node.index)
    for node in nodes:
        node.dependents = tuple(dependents[node.index])
    # Kahn's algorithm: a topological order (definition order among equals).
    waiting = [len(n.deps) for n in nodes]
    ready = deque(n.index for n in nodes if not n.deps)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for d in nodes[i].dependents:
            waiting[d] -= 1
            if not waiting[d]:
                ready.append(d)
    return Plan(nodes, order, pipeline.name, validators=bool(pipeline.validators))
