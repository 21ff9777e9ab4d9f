"""One settings object for a run: endpoint, models, limits and retries.

Every field can be set in code, or through the environment: ``APR_<FIELD>`` (for example
``APR_MAX_THREADS=4``), and the standard ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AprSettings", "MergeStrategy", "Role"]

Role = Literal["planner", "worker", "synthesizer"]
"""The three kinds of model call a run makes (verifier and judge calls use ``synthesizer``)."""

_ROLES = get_args(Role)

MergeStrategy = Literal["concat", "synthesize", "vote", "race", "best"]
"""How thread results become the answer: each part's answer under its subtask (no call), a
model merge, a majority vote with early stop, the first verified result (siblings cancelled),
or the result a judge call picks."""


def _aiohttp_only(value: str) -> str:
    if value == "httpx":
        raise ValueError(
            "http_client='httpx' is no longer offered: every request goes on aiohttp, which "
            "costs less client CPU per streamed token (BENCHMARKS.md); drop the setting "
            "(and APR_HTTP_CLIENT)"
        )
    return value


class AprSettings(BaseSettings):
    """Settings for one apr-graph: where the model lives and how far a run may go.

    Example:
        >>> s = AprSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B")
        >>> s.model_for("worker")
        'Qwen/Qwen3-8B'
    """

    model_config = SettingsConfigDict(
        env_prefix="APR_",
        enable_decoding=False,  # list fields read "a,b" from the environment, not JSON
        extra="forbid",
        validate_assignment=True,
        populate_by_name=True,
        use_attribute_docstrings=True,  # each field's docstring is its schema description
    )

    base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("APR_BASE_URL", "OPENAI_BASE_URL"),
    )
    """OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1``. ``None``: the caller
    (the CLI) supplies one, or the client fails with a clear error."""

    base_urls: list[str] = Field(default_factory=list)
    """More endpoints serving the same model: each request goes to the least-loaded one, one
    refusing connections is avoided for a while. ``APR_BASE_URLS`` is comma-separated."""

    api_key: SecretStr = Field(
        default=SecretStr("not-needed"),
        validation_alias=AliasChoices("APR_API_KEY", "OPENAI_API_KEY"),
    )
    """API key; local servers accept anything. Never stored in graph state or logs."""

    model: str = "default"
    """Model name sent with every request, unless a role override is set."""

    planner_model: str | None = None
    """Model for the decompose call (defaults to ``model``)."""

    worker_model: str | None = None
    """Model for thread calls (defaults to ``model``)."""

    synthesizer_model: str | None = None
    """Model for the merge, verifier and judge calls (defaults to ``model``)."""

    max_threads: int = Field(default=8, ge=1, le=4096)
    """The most threads one decomposition may start; larger plans are clamped. A context too
    long for one request is read in as many parts as it needs, up to ``max_total_threads``."""

    max_concurrency: int = Field(default=8, ge=1, le=1024)
    """The most model requests in flight at once toward the server."""

    request_timeout_s: float = Field(default=120.0, gt=0)
    """Timeout of one HTTP request, in seconds."""

    http_client: Annotated[Literal["auto", "aiohttp", "httpx"], AfterValidator(_aiohttp_only)] = (
        "auto"
    )
    """Deprecated: every request goes on aiohttp (one session per event loop). ``auto`` and
    ``aiohttp`` are accepted and mean that; ``httpx`` is refused."""

    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries of one request after a transient error (connection, timeout, 408, 409, 429, 5xx)."""

    retry_max_wait_s: float = Field(default=30.0, ge=0)
    """The longest single wait between retries, including a server's ``Retry-After``."""

    max_repairs: int = Field(default=2, ge=0, le=10)
    """Re-asks of a structured answer that fails validation, showing the model its error (none
    more once the model gives the same reply again)."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature of every call."""

    direct_instructions: str | None = Field(default=None, min_length=1)
    """The system message of a direct answer (and ``apr bench``'s sequential baseline);
    ``None``: ``prompts.DIRECT_SYSTEM`` for a task with a number in it, else
    ``prompts.DIRECT_PLAIN_SYSTEM`` (and none with a context: ``prompts.direct_messages``)."""

    planner_max_tokens: int = Field(default=1024, ge=16)
    """Output-token allowance of the decompose call."""

    worker_max_tokens: int = Field(default=1024, ge=16)
    """Output-token allowance of each thread."""

    synthesizer_max_tokens: int = Field(default=1024, ge=16)
    """Output-token allowance of the merge call."""

    max_depth: int = Field(default=2, ge=1, le=8)
    """Levels of decomposition: 1 means threads never fork again; 2 lets a thread fork once."""

    max_total_threads: int = Field(default=32, ge=1, le=4096)
    """The most threads a whole run may start, nested forks and replacements included."""

    merge: MergeStrategy | None = None
    """Force a merge strategy; ``None`` lets the model choose one in its plan."""

    token_budget: int | None = Field(default=None, ge=1)
    """Prompt + completion tokens for the whole run. When spent, nothing new starts, threads
    are cancelled and the answer is built from what finished (marked incomplete)."""

    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds for the whole run, with the same behaviour as ``token_budget`` when reached."""

    max_replacements: int = Field(default=1, ge=0, le=10)
    """Fresh attempts for a thread that fails verification or reports a dead end."""

    stop_loops: bool = True
    """Stop a streamed reply (thread, plan, merge, direct answer) where it starts repeating
    itself (a block of words back to back, or one sentence a fifth time; ``apr_graph.loops``):
    the request is closed, the text before the loop kept, the thread marked ``looped``, and
    never retried with more room."""

    retry_loops: bool = True
    """Give a thread or a direct answer that looped before an eighth of its allowance one
    fresh attempt (same allowance, told it repeated itself) if the budget and deadline allow.
    A reply that looped after a real answer keeps it: another attempt would lengthen the
    critical path."""

    loop_retry_temperature: float = Field(default=0.4, ge=0.0, le=2.0)
    """Temperature of that fresh attempt (never below the call's own): greedy decoding that
    looped tends to loop again on nearly the same prompt, sampling leaves the rut (on
    Qwen2.5-1.5B, 1 of 2 retries looped again at 0.0, none of 6 at 0.4)."""

    stop_copy_lines: int = Field(default=12, ge=0)
    """Stop a thread's reply once it rewrites one of its documents from the top with this
    many unchanged lines in a row, or copies three times as many lines of its input from
    elsewhere; what came before the copy is kept, recorded as ``looped`` (with
    ``copied_lines``), never retried with more room. Not watched when the task or goal asks
    for documents changed or quoted (``loops.asks_for_input_text``), nor for threads with
    tools, direct answers or merges. 0: never."""

    min_thread_tokens: int = Field(default=256, ge=16)
    """The smallest output allowance the plan may give one thread (planners guess low); a
    thread still cut off is continued once from where it stopped."""

    vote_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    """Temperature of repeated attempts at one goal (a vote): at 0 they would all agree."""

    native: Literal["threadweaver", "multiverse"] | None = None
    """For models trained to write their own parallel blocks: stream their reasoning through
    the completions API and fork one request per outline (see ``apr_graph.nodes.native``)."""

    native_prompt: str | None = None
    """The raw prompt of a native run, with ``{task}`` and ``{context}`` (after a blank line,
    or empty); ``None``: the one the model was trained on (``apr_graph.native.FORMATS``)."""

    native_max_tokens: int = Field(default=8000, ge=16)
    """Tokens one chain of a native run (the main reasoning or one thread) may generate over
    all its requests; a thread that reaches it is closed and recorded as ``cancelled``."""

    native_skip_special_tokens: bool = False
    """Sent as ``skip_special_tokens``: the models' tags are special tokens, which vLLM and
    SGLang drop by default, and then nothing forks."""

    native_stop_token_ids: dict[str, int] = Field(default_factory=dict)
    """Token ids of the tags the run stops at (e.g. ``{"</Goal>": 151670}``), sent as
    ``stop_token_ids`` beside the stop strings, for servers that take them (vLLM, SGLang)."""

    native_require_tags: bool | None = None
    """Raise ``NativeProtocolError`` when a native run's text has none of the model's tags
    (a server that drops special tokens). ``None``: yes for ``multiverse``, no for
    ``threadweaver`` (its model may answer without a block)."""

    probe_capacity: bool = True
    """Ask the server once how many requests it runs at once (llama.cpp ``/props`` or
    ``/slots``, vLLM ``/metrics``) and size the concurrency to it, capped by
    ``max_concurrency`` (servers that do not say keep it)."""

    stream_plan: bool = True
    """Start each thread as soon as its subtask is complete in the streamed plan; it is kept
    only if the final, repaired plan gives it the same request, else cancelled and rerun."""

    review_plan: bool = False
    """Pause a run once its plan is made, before any thread's request, for a person or a
    program to approve or edit it (LangGraph's ``interrupt``; needs a checkpointer). Resume
    with ``Command(resume=True)``, or with a list of goals or a plan to run instead."""

    label_goals: bool = True
    """When the task labels its parts ((a), (b) ... or 1., 2. ...), a parallel plan names each
    subtask by its label and its thread is given that part's text: a shorter plan, so threads
    start sooner. Only those labels are then allowed as goals: turn it off where the labels
    mark data rather than parts to solve."""

    warm_prefix: bool = False
    """Before a fan-out, send one tiny request with the threads' shared prefix to warm the
    server's prefix cache."""

    thread_documents: Literal["named", "all"] = "named"
    """When the context is named documents (``{"task": ..., "context": {"calc.py": "..."}}``):
    ``named`` gives a thread only the documents its goal names (all of them when it names
    none), ``all`` gives every thread the whole context (for parts that depend on each
    other). The plan, the merge and a direct answer always read every document."""

    plan_documents: bool = True
    """Plan without a model call a task whose labelled parts each name one of its documents
    ("Review (a) calc.py (b) io.py") and ask nothing across them: one thread per part,
    reading its own document, results under their labels (merge ``concat`` unless ``merge``
    is set). Off, with tools, or with ``merge`` ``vote``/``race``/``best``, the planner
    plans it."""

    planner_document_chars: int | None = Field(default=600, ge=0)
    """With named documents, the planner reads each one's name, size and first this many
    characters (``None``: all of it), so their prefill does not delay the first thread. A
    planner that read only a part does not answer itself: a direct answer reads them all."""

    max_tool_calls: int = Field(default=4, ge=0, le=64)
    """Tool calls one thread may make (with ``create_apr_graph(tools=...)``)."""

    stream_tokens: bool = False
    """Emit a ``token`` custom event for every piece of every thread's answer."""

    on_thread_error: Literal["tolerate", "fail"] = "tolerate"
    """A thread that still fails after retries: ``tolerate`` records it as failed and tells
    the merge; ``fail`` ends the run."""

    prefer: Literal["speed", "quality"] = "speed"
    """What a fork must buy. ``speed``: fork only where the plan is predicted to beat one
    direct call on this endpoint (its speed profile: ``apr calibrate`` or earlier runs; with
    none, fork as the task and plan say). ``quality``: fork whenever the task splits into
    independent parts, whatever the server."""

    router: bool = True
    """Read a top-level task with the shipped router (``apr_graph.router``) before planning:
    a task that reads as one continuous piece (a story, one explanation) is answered by one
    call, with no planning call. Off: the planner model alone decides (as it does for a
    graph given tools: the router cannot tell which tasks need them)."""

    speed_file: str | None = None
    """The JSON file of measured endpoint speeds; ``None``: ``$APR_SPEED_FILE``, else
    ``~/.cache/apr-graph/speed.json``; ``""``: in memory only."""

    speed_endpoint: str | None = None
    """The name the endpoint's speed profile is kept under, instead of its ``base_url``: the
    embedded local model names it after its file and slots, as its server's port changes
    with every start."""

    learn_speed: bool = True
    """Update the endpoint's speed profile from each finished run's calls."""

    probe_speed: bool = True
    """Before the first fork decision on an endpoint whose profile has no figure for threads
    at once, measure it (a few seconds on a CPU server, well under one on a GPU; once per
    graph and endpoint, stored as runs' figures are). Off: such a first run forks as the
    router and planner say, and its threads teach the figure."""

    structured_output: Literal["auto", "json_schema", "json_object", "prompt"] = "auto"
    """How to ask for JSON: ``auto`` tries ``json_schema``, ``json_object``, then the schema
    in the prompt, and remembers per endpoint what worked."""

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {value!r} "
                "(for example http://localhost:8000/v1)"
            )
        return value.rstrip("/")

    @field_validator("base_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [cls._check_base_url(str(v).strip()) for v in value]
        return value

    @model_validator(mode="after")
    def _check_models(self) -> AprSettings:
        if self.base_url is None and self.base_urls:
            self.base_url = self.base_urls[0]
        for name in ("model", "planner_model", "worker_model", "synthesizer_model"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must not be empty")
        return self

    def model_for(self, role: Role | str) -> str:
        """The model name used for ``role`` (other roles, e.g. benchmark baselines: ``model``)."""
        override: str | None = getattr(self, f"{role}_model") if role in _ROLES else None
        return override or self.model

    def max_tokens_for(self, role: Role | str) -> int:
        """The output-token allowance of one call of ``role`` (others: ``worker_max_tokens``)."""
        return int(getattr(self, f"{role if role in _ROLES else 'worker'}_max_tokens"))
