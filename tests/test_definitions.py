"""Definitions are validated up front, with errors that say what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from kapbit import Definition, Failure, InvalidDefinition, Kapbit, Progress, Step, Success
from kapbit.repository import MemRepository


def _ok(input: Any, progress: Progress) -> Success[None]:
    return Success()


def test_a_definition_needs_steps() -> None:
    with pytest.raises(InvalidDefinition, match="'empty' has no steps"):
        Definition("empty", [])


def test_actions_must_be_callable() -> None:
    with pytest.raises(InvalidDefinition, match="execute is not callable"):
        Step("not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidDefinition, match="compensate is not callable"):
        Step(_ok, 42)  # type: ignore[arg-type]


def test_steps_must_be_step_objects_with_unique_names() -> None:
    with pytest.raises(InvalidDefinition, match="step 1 is function, not Step"):
        Definition("w", [Step(_ok), _ok])  # type: ignore[list-item]
    with pytest.raises(InvalidDefinition, match="step name 'a' is used twice"):
        Definition("w", [Step(_ok, name="a"), Step(_ok, name="a")])


def test_type_must_be_a_non_empty_string_and_result_callable() -> None:
    with pytest.raises(InvalidDefinition, match="non-empty string"):
        Definition("", [Step(_ok)])
    with pytest.raises(InvalidDefinition, match="result builder is not callable"):
        Definition("w", [Step(_ok)], result="x")  # type: ignore[call-overload]


def test_instance_refuses_duplicate_types_and_non_definitions() -> None:
    repo = MemRepository()
    with pytest.raises(InvalidDefinition, match="'w' is defined twice"):
        Kapbit([Definition("w", [Step(_ok)]), Definition("w", [Step(_ok)])], repo)
    with pytest.raises(InvalidDefinition, match="expected a Definition"):
        Kapbit(["w"], repo)  # type: ignore[list-item]
    with pytest.raises(InvalidDefinition, match="no workflow definitions"):
        Kapbit([], repo)
    assert repo.records() == []


def test_progress_reads_by_index_and_name_in_order() -> None:
    definition = Definition("w", [Step(_ok, name="a"), Step(_ok, name="b"), Step(_ok, name="c")])
    progress = definition.new_progress()
    progress.record("execute", 0, Success(1))
    progress.record("execute", 1, Failure("no"))
    progress.record("compensate", 0, Success("undone"))
    assert progress.value("a") == 1 and progress.value(0) == 1
    assert progress.execution("b") == Failure("no")
    assert progress.execution("c") is None
    assert progress.compensation("a") == Success("undone")
    assert progress.executions == [(0, Success(1)), (1, Failure("no"))]
    assert progress.values() == [1]
    assert progress.failed and progress.failed_step == 1
    assert len(progress) == 2
    with pytest.raises(KeyError, match="no step named 'zz'"):
        progress.value("zz")
    with pytest.raises(KeyError, match="has no outcome yet"):
        progress.value("c")
