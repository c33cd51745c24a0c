"""The workflow model: definitions, steps, outcomes and the progress passed between them.

A workflow is an ordered list of :class:`Step`. Each step's execute action returns a
:class:`Success` (move forward; ``None`` counts as ``Success(None)``) or a :class:`Failure`
(turn around and compensate the steps that already succeeded, in reverse order, until a
compensation returns ``Failure``). An *exception* from an action is not a business
failure: it means a dependency was unavailable, and the workflow is retried later.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from kapbit.errors import InvalidDefinition

T = TypeVar("T")

Phase: TypeAlias = Literal["execute", "compensate"]


@dataclass(frozen=True, slots=True)
class Success(Generic[T]):
    """A step did what it was asked to; ``value`` is kept in the progress and the log."""

    value: T = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Failure(Generic[T]):
    """A step refused for a business reason; the workflow compensates what succeeded."""

    value: T = None  # type: ignore[assignment]


Outcome: TypeAlias = Success[Any] | Failure[Any]

#: An execute or compensate action: ``(input, progress) -> Outcome``, sync or ``async``.
Action: TypeAlias = Callable[[Any, "Progress"], "Outcome | Awaitable[Outcome | None] | None"]
#: Builds the workflow result from its input and final progress, sync or ``async``.
ResultBuilder: TypeAlias = Callable[[Any, "Progress"], Any]


class Progress:
    """The outcomes a workflow has persisted so far, readable by step and in order.

    Steps are addressed by index or by name. Each step and the result builder receive the
    progress as it stands when they run.
    """

    __slots__ = ("_compensations", "_executions", "_names")

    def __init__(self, names: dict[str, int] | None = None) -> None:
        self._names = names or {}
        self._executions: dict[int, Outcome] = {}
        self._compensations: dict[int, Outcome] = {}

    def _index(self, step: int | str) -> int:
        if isinstance(step, str):
            try:
                return self._names[step]
            except KeyError:
                raise KeyError(f"no step named {step!r}") from None
        return step

    def execution(self, step: int | str) -> Outcome | None:
        """The outcome of a step's execute action, or ``None`` if it has not run."""
        return self._executions.get(self._index(step))

    def compensation(self, step: int | str) -> Outcome | None:
        """The outcome of a step's compensation, or ``None`` if it has not run."""
        return self._compensations.get(self._index(step))

    def value(self, step: int | str) -> Any:
        """The value of a step's execute outcome; ``KeyError`` if the step has not run."""
        index = self._index(step)
        try:
            return self._executions[index].value
        except KeyError:
            raise KeyError(f"step {step!r} has no outcome yet") from None

    @property
    def executions(self) -> list[tuple[int, Outcome]]:
        """``(step, outcome)`` of every executed step, in execution order."""
        return list(self._executions.items())

    @property
    def compensations(self) -> list[tuple[int, Outcome]]:
        """``(step, outcome)`` of every compensation run, in the order they ran."""
        return list(self._compensations.items())

    def values(self) -> list[Any]:
        """The values of the successful execute outcomes, in step order."""
        return [o.value for o in self._executions.values() if isinstance(o, Success)]

    @property
    def failed_step(self) -> int | None:
        """The index of the step that returned :class:`Failure`, if any."""
        for index, outcome in self._executions.items():
            if isinstance(outcome, Failure):
                return index
        return None

    @property
    def failed(self) -> bool:
        """Whether a step returned :class:`Failure` (the workflow is compensating)."""
        return self.failed_step is not None

    @property
    def compensation_failed_step(self) -> int | None:
        """The index of the step whose compensation returned :class:`Failure`, if any.

        The rollback stops there: the steps before it are not compensated.
        """
        for index, outcome in self._compensations.items():
            if isinstance(outcome, Failure):
                return index
        return None

    def __iter__(self) -> Iterator[tuple[int, Outcome]]:
        return iter(self._executions.items())

    def __len__(self) -> int:
        return len(self._executions)

    def __repr__(self) -> str:
        return f"Progress(executions={self._executions!r}, compensations={self._compensations!r})"

    def _record(self, phase: Phase, step: int, outcome: Outcome) -> None:
        target = self._executions if phase == "execute" else self._compensations
        target[step] = outcome


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


async def _call(fn: Callable[..., Any], is_async: bool, *args: Any) -> Any:
    """Call a sync or async user function; the common sync case awaits nothing."""
    result = fn(*args)
    if is_async or inspect.isawaitable(result):
        result = await result
    return result


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a workflow: an execute action and an optional compensation.

    ``outcome_type`` is the type of this step's outcome values, used to decode them from
    the log; it defaults to the definition's ``outcome_type``.
    """

    execute: Action
    compensate: Action | None = None
    name: str | None = None
    outcome_type: Any = None
    _execute_async: bool = field(init=False, repr=False, compare=False, default=False)
    _compensate_async: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        label = self.name or getattr(self.execute, "__name__", "step")
        if not callable(self.execute):
            raise InvalidDefinition(f"step {label!r}: execute is not callable")
        if self.compensate is not None and not callable(self.compensate):
            raise InvalidDefinition(f"step {label!r}: compensate is not callable")
        object.__setattr__(self, "_execute_async", _is_async(self.execute))
        if self.compensate is not None:
            object.__setattr__(self, "_compensate_async", _is_async(self.compensate))


def _default_result(_input: Any, progress: Progress) -> list[Any]:
    return progress.values()


@dataclass(frozen=True, slots=True)
class Definition:
    """A workflow type: its name, ordered steps and result builder.

    ``input_type``, ``outcome_type`` and ``result_type`` are the Python types used to decode
    values from the log (msgspec Structs, dataclasses, primitives, or containers of them);
    ``Any`` keeps the codec's generic form. Without ``result``, the result is the list of
    the successful step values.
    """

    type: str
    steps: Sequence[Step]
    result: ResultBuilder = _default_result
    input_type: Any = Any
    outcome_type: Any = Any
    result_type: Any = Any
    _step_names: dict[str, int] = field(init=False, repr=False, compare=False)
    _result_async: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise InvalidDefinition(f"workflow type must be a non-empty string, got {self.type!r}")
        steps = tuple(self.steps)
        if not steps:
            raise InvalidDefinition(f"workflow {self.type!r} has no steps")
        names: dict[str, int] = {}
        for index, step in enumerate(steps):
            if not isinstance(step, Step):
                raise InvalidDefinition(
                    f"workflow {self.type!r}: step {index} is {type(step).__name__}, not Step"
                )
            if step.name is not None:
                if step.name in names:
                    raise InvalidDefinition(
                        f"workflow {self.type!r}: step name {step.name!r} is used twice"
                    )
                names[step.name] = index
        if not callable(self.result):
            raise InvalidDefinition(f"workflow {self.type!r}: result builder is not callable")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "_step_names", names)
        object.__setattr__(self, "_result_async", _is_async(self.result))

    def outcome_type_of(self, step: int) -> Any:
        """The type used to decode the outcome value of ``step``."""
        declared = self.steps[step].outcome_type
        return self.outcome_type if declared is None else declared

    def new_progress(self) -> Progress:
        """An empty progress that resolves this definition's step names."""
        return Progress(self._step_names)
