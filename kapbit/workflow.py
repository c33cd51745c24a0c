"""The workflow model: definitions, steps, outcomes and the progress passed between them.

A workflow is an ordered list of :class:`Step`. Each step's execute action returns a
:class:`Success` (move forward; ``None`` counts as ``Success(None)``) or a :class:`Failure`
(turn around and compensate the steps that already succeeded, in reverse order, until a
compensation returns ``Failure``). An *exception* from an action is not a business
failure: it means a dependency was unavailable, and the workflow is retried later.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, UnionType
from typing import TYPE_CHECKING, Any, Generic, Literal, Optional, TypeAlias, TypeVar, overload

from kapbit.codecs.checked import Declared, type_name, unsupported
from kapbit.errors import InvalidDefinition
from kapbit.options import StepRetry
from kapbit.timers import Sleep, SleepUntil

T = TypeVar("T")
if TYPE_CHECKING:
    from typing import _SpecialForm

    # PEP 696 defaults (typing_extensions for checkers only; Python 3.13 has them): what a
    # checker cannot infer (an unannotated lambda) is Any, and a bare ``Definition`` is
    # ``Definition[Any, Any, Any]``.
    from typing_extensions import TypeVar as DefaultTypeVar

    I = DefaultTypeVar("I", default=Any)  # noqa: E741 - the conventional name next to O, R
    O = DefaultTypeVar("O", default=Any)  # noqa: E741
    R = DefaultTypeVar("R", default=Any)
else:
    #: The type of a workflow's input.
    I = TypeVar("I")  # noqa: E741
    #: The type of a step's outcome values.
    O = TypeVar("O")  # noqa: E741
    #: The type of a workflow's result.
    R = TypeVar("R")

#: A declared type: a class (``Order``, ``str``, ``list[int]``) binds the type parameter;
#: forms a type checker cannot bind (``str | None``, ``Literal[...]``) are accepted as is.
TypeForm: TypeAlias = "type[T] | UnionType | _SpecialForm"

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

#: What an action returns: ``Success(value)``, ``Failure(value)`` or ``None`` (a bare
#: ``return``, which counts as ``Success(None)``).
Returned: TypeAlias = "Success[O] | Failure[O] | None"
#: What an execute action returns: also a durable timer, ``Sleep(delay, value)`` or
#: ``SleepUntil(when, value)`` (the step succeeded; the next step runs when it fires).
Executed: TypeAlias = "Success[O] | Failure[O] | Sleep[O] | SleepUntil[O] | None"
#: An execute action: ``(input, progress) -> Executed``, sync or ``async``.
Action: TypeAlias = "Callable[[I, Progress], Executed[O] | Awaitable[Executed[O]]]"
#: A compensate action: ``(input, progress) -> Returned``, sync or ``async`` (no timers:
#: a rollback does not wait).
Compensation: TypeAlias = "Callable[[I, Progress], Returned[O] | Awaitable[Returned[O]]]"
#: Builds the workflow result from its input and final progress, sync or ``async``.
ResultBuilder: TypeAlias = "Callable[[I, Progress], R | Awaitable[R]]"


class Progress:
    """The outcomes a workflow has persisted so far, readable by step and in order.

    Steps are addressed by index or by name. Each step and the result builder receive the
    progress as it stands when they run.
    """

    __slots__ = ("_compensations", "_executions", "_failed", "_names")

    def __init__(self, names: dict[str, int] | None = None) -> None:
        self._names = names or {}
        self._executions: dict[int, Outcome] = {}
        self._compensations: dict[int, Outcome] = {}
        self._failed: int | None = None  # the first step recorded as Failure

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
        return self._failed

    @property
    def failed(self) -> bool:
        """Whether a step returned :class:`Failure` (the workflow is compensating)."""
        return self._failed is not None

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

    def record(self, phase: Phase, step: int, outcome: Outcome) -> None:
        """Add an outcome (the engine does, as it persists or recovers one)."""
        if phase == "execute":
            self._executions[step] = outcome
            if self._failed is None and isinstance(outcome, Failure):
                self._failed = step
        else:
            self._compensations[step] = outcome


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
class Step(Generic[I, O]):
    """One step of a workflow: an execute action and an optional compensation.

    ``outcome_type`` is the type of this step's outcome values; it defaults to the
    definition's ``outcome_type``. Values are checked against it when they are written and
    decoded with it when read back; ``None`` (a bare ``return``) is always allowed.

    ``retry`` retries the action in place when it raises (see :class:`StepRetry`); without
    it a raising step goes to the instance's retry worker. ``timeout`` (seconds) cancels an
    action that runs longer; that counts as a raised error (:class:`~kapbit.errors.StepTimedOut`).
    A sync action runs in a thread, which cannot be stopped: its late result is discarded.
    """

    execute: Action[I, O]
    compensate: Compensation[I, O] | None = None
    name: str | None = None
    outcome_type: TypeForm[O] | None = None
    retry: StepRetry | None = field(default=None, kw_only=True)
    timeout: float | None = field(default=None, kw_only=True)
    #: The step's name, or its execute action's name when it has none.
    label: str = field(init=False, repr=False, compare=False, default="")
    #: What each phase runs: the function and whether it is a coroutine function.
    actions: Mapping[Phase, tuple[Callable[..., Any], bool]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        label = self.name or str(getattr(self.execute, "__name__", "step"))
        object.__setattr__(self, "label", label)
        if not callable(self.execute):
            raise InvalidDefinition(f"step {label!r}: execute is not callable")
        if self.compensate is not None and not callable(self.compensate):
            raise InvalidDefinition(f"step {label!r}: compensate is not callable")
        if self.retry is not None and not isinstance(self.retry, StepRetry):
            raise InvalidDefinition(f"step {label!r}: retry must be a StepRetry")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise InvalidDefinition(
                f"step {label!r}: timeout must be a positive number of seconds, "
                f"got {self.timeout!r}"
            )
        if self.outcome_type is not None:
            _check_type(f"step {label!r}: outcome_type", self.outcome_type)
        actions: dict[Phase, tuple[Callable[..., Any], bool]] = {
            "execute": (self.execute, _is_async(self.execute))
        }
        if self.compensate is not None:
            actions["compensate"] = (self.compensate, _is_async(self.compensate))
        object.__setattr__(self, "actions", MappingProxyType(actions))


def _default_result(_input: Any, progress: Progress) -> list[Any]:
    return progress.values()


def _check_type(what: str, declared: Any) -> None:
    """Refuse a declared type the codecs cannot decode: the log could not be read back."""
    reason = unsupported(declared)
    if reason is not None:
        raise InvalidDefinition(f"{what} {type_name(declared)} cannot be decoded: {reason}")


def _or_none(declared: Any) -> Any:
    """``declared | None``: the type outcome values are checked against (``Any`` stays)."""
    return declared if declared is Any else Optional[declared]  # noqa: UP045 - any form


@dataclass(frozen=True, slots=True, init=False)
class Definition(Generic[I, O, R]):
    """A workflow type: its name, ordered steps and result builder, and declared types.

    ``input_type``, ``outcome_type`` and ``result_type`` are the Python types of the input,
    the steps' outcome values and the result (msgspec Structs, dataclasses, primitives,
    containers and unions of them; ``Any``, the default, keeps the codec's generic form).
    Values are checked against them when they are written and decoded with them when read
    back, so a wrong type fails on the first run. A type the codecs cannot decode is refused
    here (:class:`~kapbit.errors.InvalidDefinition`). Without ``result``, the result is the
    list of the successful step values.

    A type checker infers ``Definition[Input, Outcome, Result]`` from the arguments and
    reports a declared type that does not match the actions' annotations. Steps with
    outcome types of their own leave out the definition's ``outcome_type``.
    """

    type: str
    steps: Sequence[Step[I, Any]]
    result: ResultBuilder[I, R]
    input_type: Any
    outcome_type: Any
    result_type: Any
    _step_names: dict[str, int] = field(repr=False, compare=False)
    #: The declared input type, prepared for checks.
    input_check: Declared = field(repr=False, compare=False)
    #: The declared result type, prepared for checks.
    result_check: Declared = field(repr=False, compare=False)
    #: Each step's outcome type (:meth:`outcome_type_of`), prepared for checks.
    outcome_checks: tuple[Declared, ...] = field(repr=False, compare=False)
    _result_async: bool = field(repr=False, compare=False)

    @overload
    def __init__(
        self: Definition[I, O, R],
        type: str,
        steps: Sequence[Step[I, O]],
        result: ResultBuilder[I, R],
        input_type: TypeForm[I] = ...,
        *,
        outcome_type: TypeForm[O],
        result_type: TypeForm[R] = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Definition[I, Any, R],
        type: str,
        steps: Sequence[Step[I, Any]],
        result: ResultBuilder[I, R],
        input_type: TypeForm[I] = ...,
        *,
        result_type: TypeForm[R] = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Definition[I, O, list[Any]],
        type: str,
        steps: Sequence[Step[I, O]],
        *,
        input_type: TypeForm[I] = ...,
        outcome_type: TypeForm[O],
        result_type: Any = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Definition[I, Any, list[Any]],
        type: str,
        steps: Sequence[Step[I, Any]],
        *,
        input_type: TypeForm[I] = ...,
        result_type: Any = ...,
    ) -> None: ...

    def __init__(
        self,
        type: str,
        steps: Sequence[Step[Any, Any]],
        result: Callable[[Any, Progress], Any] = _default_result,
        input_type: Any = Any,
        *,
        outcome_type: Any = Any,
        result_type: Any = Any,
    ) -> None:
        if not isinstance(type, str) or not type:
            raise InvalidDefinition(f"workflow type must be a non-empty string, got {type!r}")
        steps = tuple(steps)
        if not steps:
            raise InvalidDefinition(f"workflow {type!r} has no steps")
        names: dict[str, int] = {}
        for index, step in enumerate(steps):
            if not isinstance(step, Step):
                raise InvalidDefinition(
                    f"workflow {type!r}: step {index} is {step.__class__.__name__}, not Step"
                )
            if step.name is not None:
                if step.name in names:
                    raise InvalidDefinition(
                        f"workflow {type!r}: step name {step.name!r} is used twice"
                    )
                names[step.name] = index
        if not callable(result):
            raise InvalidDefinition(f"workflow {type!r}: result builder is not callable")
        for what, declared in (
            ("input_type", input_type),
            ("outcome_type", outcome_type),
            ("result_type", result_type),
        ):
            _check_type(f"workflow {type!r}: {what}", declared)
        outcome_checks = tuple(
            Declared(_or_none(outcome_type if step.outcome_type is None else step.outcome_type))
            for step in steps
        )
        for name, value in (
            ("type", type),
            ("steps", steps),
            ("result", result),
            ("input_type", input_type),
            ("outcome_type", outcome_type),
            ("result_type", result_type),
            ("_step_names", names),
            ("input_check", Declared(input_type)),
            ("result_check", Declared(result_type)),
            ("outcome_checks", outcome_checks),
            ("_result_async", _is_async(result)),
        ):
            object.__setattr__(self, name, value)

    def outcome_type_of(self, step: int) -> Any:
        """The type the outcome values of ``step`` are checked against and decoded with:
        its declared outcome type (or the definition's) or ``None``."""
        return self.outcome_checks[step].type

    def new_progress(self) -> Progress:
        """An empty progress that resolves this definition's step names."""
        return Progress(self._step_names)


def parse_call(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Definition[Any, Any, Any] | None, Any, Any, Any]:
    """``(definition or None, workflow type, workflow id, input)`` of a call in either form.

    ``(definition, workflow_id, input)`` runs a definition object; ``(workflow_id,
    workflow_type, input=None)`` names the type (the older form). Keywords use those names.
    A call that fits neither raises :class:`TypeError`, as Python does for a bad call.
    """
    if not kwargs and len(args) in (2, 3):  # the common case, without binding
        first, second = args[0], args[1]
        input = args[2] if len(args) == 3 else None
    else:
        typed = (bool(args) and isinstance(args[0], Definition)) or "workflow" in kwargs
        signature = _TYPED_CALL if typed else _NAMED_CALL
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        first, second, input = bound.args
    if isinstance(first, Definition):
        return first, first.type, second, input
    return None, second, first, input


def _typed_call(workflow: Any, workflow_id: Any, input: Any) -> None: ...


def _named_call(workflow_id: Any, workflow_type: Any, input: Any = None) -> None: ...


_TYPED_CALL = inspect.signature(_typed_call)
_NAMED_CALL = inspect.signature(_named_call)
