"""Per-run settings: the graph's ``context_schema``.

One compiled graph serves every run; a run may change its models, width, merge, budgets and
deadline through LangGraph's run context::

    await app.ainvoke({"task": "..."}, context={"max_threads": 2, "merge": "concat"})

The keys are ``AprSettings`` fields, checked by the same constraints. What belongs to the
endpoint or the graph's shape (``GRAPH_ONLY``) is set once, on the graph's ``AprSettings``: a
context naming it is refused, as is an unknown key.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Annotated, Any, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from apr_graph.settings import AprSettings

__all__ = ["GRAPH_ONLY", "AprContext"]

GRAPH_ONLY: dict[str, str] = {
    "base_url": "the endpoint",
    "base_urls": "the endpoint",
    "api_key": "the endpoint's secret",
    "http_client": "the graph's HTTP client, shared by every run",
    "request_timeout_s": "the graph's HTTP client, shared by every run",
    "max_concurrency": "the endpoint's concurrency limit, shared by every run",
    "probe_capacity": "the endpoint's capacity, probed once for every run",
    "max_retries": "the client's retry policy, shared by every run",
    "retry_max_wait_s": "the client's retry policy, shared by every run",
    "max_repairs": "the client's structured-output chain, shared by every run",
    "structured_output": "the structured-output mode remembered per endpoint",
    "speed_file": "the endpoint's speed profile, shared by every run",
    "learn_speed": "the endpoint's speed profile, shared by every run",
    "speed_endpoint": "the endpoint's speed profile, shared by every run",
    "probe_speed": "the endpoint's speed profile, shared by every run",
    "native": "the graph's shape",
    "native_prompt": "the graph's native format",
    "native_skip_special_tokens": "what the endpoint needs of native requests",
    "native_stop_token_ids": "what the endpoint needs of native requests",
    "native_require_tags": "the graph's native format",
}
"""``AprSettings`` fields a run may not change, and whose they are."""


_PER_RUN = (  # noqa: SIM905
    "model planner_model worker_model synthesizer_model temperature direct_instructions "
    "planner_max_tokens worker_max_tokens synthesizer_max_tokens max_threads max_depth "
    "max_total_threads merge token_budget deadline_s max_replacements stop_loops retry_loops "
    "loop_retry_temperature stop_copy_lines min_thread_tokens vote_temperature "
    "native_max_tokens stream_plan label_goals warm_prefix thread_documents plan_documents "
    "planner_document_chars max_tool_calls stream_tokens on_thread_error prefer router review_plan"
).split()
"""``AprSettings`` fields a run may change (each described by its setting's docstring)."""

if TYPE_CHECKING:
    _PerRunFields = BaseModel
else:
    # Each field takes the type (made optional), bounds and description of its setting.
    _PerRunFields = create_model(
        "_PerRunFields",
        **{
            name: (
                Annotated[
                    (field.annotation | None, *field.metadata, Field(description=field.description))
                ],
                None,
            )
            for name in _PER_RUN
            for field in [AprSettings.model_fields[name]]
        },
    )


class AprContext(_PerRunFields):
    """What one run may change of the graph's ``AprSettings`` (LangGraph's run context).

    Every field is optional: a field left out keeps the graph's setting. Each has the meaning
    and the bounds of the ``AprSettings`` field of the same name.

    Example:
        >>> app = compile_apr_graph(settings=settings)  # doctest: +SKIP
        >>> await app.ainvoke(  # doctest: +SKIP
        ...     {"task": "Compare A, B and C"},
        ...     context={"model": "Qwen/Qwen3-8B", "max_threads": 3, "deadline_s": 30},
        ... )
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # a context naming api_key must not echo the key
    )

    _applied: tuple[AprSettings, AprSettings] | None = PrivateAttr(default=None)
    """The last ``apply``: its base and its result (every node of a run asks again)."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in cls.model_fields:
                continue
            if key in GRAPH_ONLY:
                raise ValueError(
                    f"{key!r} cannot be set per run: it is {GRAPH_ONLY[key]}; set "
                    f"AprSettings({key}=...) (or APR_{key.upper()}) where the graph is built, "
                    "and drop it from the context"
                )
            close = difflib.get_close_matches(str(key), cls.model_fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown per-run setting {key!r}: {hint}the context takes "
                f"{', '.join(cls.model_fields)}"
            )
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _required_is_not_none(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name in _NOT_NULLABLE:
            raise ValueError("cannot be None: leave it out to keep the graph's setting")
        if info.field_name in _MODELS and isinstance(value, str) and not value.strip():
            raise ValueError("a model name must not be empty")
        return value

    @classmethod
    def of(cls, settings: AprSettings) -> AprContext:
        """The context that gives a run exactly ``settings``' per-run values."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})

    def apply(self, settings: AprSettings) -> AprSettings:
        """``settings`` with this run's values (``settings`` itself when none is set)."""
        applied = self._applied
        if applied is not None and applied[0] is settings:
            return applied[1]
        update = self.model_dump(exclude_unset=True)
        # Every value was checked against the field's bounds above: no second validation.
        result = settings.model_copy(update=update) if update else settings
        self._applied = (settings, result)
        return result


_MODELS = frozenset({"model", "planner_model", "worker_model", "synthesizer_model"})

_NOT_NULLABLE = frozenset(
    name
    for name in AprContext.model_fields
    if type(None) not in get_args(AprSettings.model_fields[name].annotation)
)
"""Per-run fields whose ``AprSettings`` field has no ``None`` (``max_threads=None`` is no
setting at all)."""
