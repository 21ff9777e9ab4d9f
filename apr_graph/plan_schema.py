"""What the model writes when it plans: the plan as pydantic validates it (leniently: repair
happens in ``plan``), and the JSON schema sent to servers that constrain output to it."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["WORKING_MAX_CHARS", "Plan", "Subtask", "plan_json_schema"]

_LABEL = re.compile(r"(?=[\w-]*[a-z])(?=[\w-]*[\d_])[\w-]+", re.I)
"""A goal that is one token of letters with digits or underscores ("idea1", "part_2"): a
name for a part, not the part (a 1.5B planner wrote "idea1", "recipe1", "haiku1")."""


class Subtask(BaseModel):
    """One piece of the task, solved by one thread."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(description="Short unique id, e.g. 's1'.")
    goal: str = Field(description="What this thread must find out or produce, self-contained.")
    depends_on: list[str] = Field(
        default_factory=list, description="Ids of subtasks whose results this one needs."
    )
    fork: bool = Field(
        default=False, description="True if this subtask is itself worth splitting further."
    )
    max_tokens: int | None = Field(
        default=None, description="Output tokens this thread needs: small for easy parts."
    )

    @field_validator("goal")
    @classmethod
    def _not_a_label(cls, value: str) -> str:
        if _LABEL.fullmatch(value.strip()):
            raise ValueError(
                f"the goal {value.strip()!r} is a label, not a goal: write each goal out in "
                "full, as a question or instruction that makes sense on its own"
            )
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("depends_on", mode="before")
    @classmethod
    def _ids_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str | int):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("fork", mode="before")
    @classmethod
    def _lenient_bool(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _lenient_int(cls, value: Any) -> Any:
        if isinstance(value, str):
            return int(value) if value.strip().isdigit() else None
        return value


class Plan(BaseModel):
    """The model's decision: answer directly, or split into independent subtasks."""

    model_config = ConfigDict(extra="ignore")

    strategy: Literal["direct", "parallel"] = Field(
        description="'direct' for a simple task, 'parallel' when it splits into independent parts."
    )
    working: str | None = Field(
        default=None,
        description="For 'direct': a line or two of working (the calculation, the fact).",
    )
    answer: str | None = Field(
        default=None, description="For 'direct': the complete final answer. Else null."
    )
    subtasks: list[Subtask] = Field(
        default_factory=list,
        description="For 'parallel': the independent subtasks. Else empty.",
    )
    merge: str | None = Field(
        default=None,
        description="How to combine results: concat, synthesize, vote, race or best.",
    )
    depends_on: dict[str, list[str]] = Field(
        default_factory=dict,
        description="For 'parallel', rarely: goal number -> numbers of the goals it needs.",
    )
    fork: list[str] = Field(
        default_factory=list,
        description="For 'parallel', rarely: numbers of the goals large enough to split again.",
    )

    @field_validator("depends_on", mode="before")
    @classmethod
    def _dependency_map(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return {}
        refs = {str(k): v if isinstance(v, list) else [v] for k, v in value.items()}
        return {k: [str(r) for r in v if isinstance(r, str | int)] for k, v in refs.items()}

    @field_validator("fork", mode="before")
    @classmethod
    def _fork_list(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return []
        return [str(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)]

    @model_validator(mode="after")
    def _apply_options(self) -> Plan:
        """Apply the plan-level ``depends_on`` and ``fork`` to the subtasks they name (by id,
        or by number from 1); a reference to no subtask is left for plan repair to report."""
        if not (self.depends_on or self.fork):
            return self
        for index, subtask in enumerate(self.subtasks, start=1):
            subtask.id = subtask.id.strip() or f"s{index}"

        def resolve(ref: str) -> Subtask | None:
            ref = ref.strip()
            for subtask in self.subtasks:
                if subtask.id == ref:
                    return subtask
            if ref.isdigit() and 1 <= int(ref) <= len(self.subtasks):
                return self.subtasks[int(ref) - 1]
            return None

        for key, refs in self.depends_on.items():
            target = resolve(key)
            if target is not None:
                found = [resolve(r) for r in refs]
                names = [f.id if f is not None else r for f, r in zip(found, refs, strict=True)]
                target.depends_on = list(dict.fromkeys([*target.depends_on, *names]))
        for ref in self.fork:
            target = resolve(ref)
            if target is not None:
                target.fork = True
        return self

    @field_validator("merge", mode="before")
    @classmethod
    def _known_merge(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return None
        value = value.strip().lower()
        return value if value in {"concat", "synthesize", "vote", "race", "best"} else None

    @field_validator("strategy", mode="before")
    @classmethod
    def _normalise_strategy(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("answer", mode="before")
    @classmethod
    def _number_is_text(cls, value: Any) -> Any:
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("subtasks", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):  # a subtask may be written as its goal alone
            return [{"id": "", "goal": v} if isinstance(v, str) else v for v in value]
        return value


WORKING_MAX_CHARS = 400
"""The longest ``working`` a direct plan may write (about 100 tokens): one calculation or
fact, not a chain of thought."""


def plan_json_schema(
    max_threads: int, labels: list[str] | None = None, *, answer: bool = True
) -> dict[str, Any]:
    """The JSON schema sent to the server: a direct answer *or* bounded subtasks.

    Two alternatives, so that a constrained decoder cannot write subtasks after a direct
    answer (small models loop on junk subtasks), with at most ``max_threads`` subtasks.

    ``labels``: the task's labelled parts (``["a", "b"]``); each subtask is then one of them,
    written as its label (``"(b)"``). ``answer=False``: a direct plan is
    ``{"strategy": "direct"}`` alone (the planner did not read the whole context).
    """
    number = {"type": "integer", "minimum": 1, "maximum": max_threads}
    numbers = {"type": "array", "items": number, "maxItems": max_threads}
    goal: dict[str, Any] = (
        {"type": "string", "enum": [f"({label})" for label in labels]}
        if labels
        else {"type": "string", "maxLength": 600}
    )
    direct: dict[str, Any] = {"strategy": {"type": "string", "enum": ["direct"]}}
    if answer:  # a short working before the answer: small models get more right
        direct["working"] = {"type": "string", "maxLength": WORKING_MAX_CHARS}
        direct["answer"] = {"type": "string"}
    parallel = {
        "strategy": {"type": "string", "enum": ["parallel"]},
        "merge": {"type": "string", "enum": ["concat", "synthesize", "vote", "race", "best"]},
        # Goals alone, their rare options after them by number: offered objects, small
        # models write every option of every subtask, delaying every thread.
        "subtasks": {"type": "array", "items": goal, "minItems": 1, "maxItems": max_threads},
        "depends_on": {"type": "object", "additionalProperties": numbers},
        "fork": numbers,
    }
    # merge is required, so written before the subtasks (llama.cpp puts optional properties
    # last): a thread can start as soon as its subtask is written.
    return {
        "title": "Plan",
        "anyOf": [
            _object(direct, list(direct)),
            _object(parallel, ["strategy", "merge", "subtasks"]),
        ],
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
