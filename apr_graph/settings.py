"""One settings object for a run: endpoint, models, limits and retries.

Every field can be set in code, or through the environment: ``APR_<FIELD>`` (for example
``APR_MAX_THREADS=4``), and the standard ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    )

    base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("APR_BASE_URL", "OPENAI_BASE_URL"),
    )
    """OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1``. ``None``: the caller
    (the CLI) supplies one, or the client fails with a clear error."""

    base_urls: list[str] = Field(default_factory=list)
    """More endpoints serving the same model (a fleet of vLLM/SGLang replicas): every request
    goes to the least-loaded one, and one that refuses connections is avoided for a while.
    ``APR_BASE_URLS`` takes a comma-separated list."""

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
    """Model for the merge call (defaults to ``model``)."""

    max_threads: int = Field(default=8, ge=1, le=4096)
    """The most threads one decomposition may start; larger plans are clamped."""

    max_concurrency: int = Field(default=8, ge=1, le=1024)
    """The most model requests in flight at once toward the server."""

    request_timeout_s: float = Field(default=120.0, gt=0)
    """Timeout of one HTTP request, in seconds."""

    http_client: Annotated[Literal["auto", "aiohttp", "httpx"], AfterValidator(_aiohttp_only)] = (
        "auto"
    )
    """Deprecated: every request goes on aiohttp (apr-graph's own sessions, one per event
    loop; about half the client CPU per thread of httpx in fan-outs of hundreds of threads,
    BENCHMARKS.md). ``auto`` and ``aiohttp`` are accepted and mean that; ``httpx`` is
    refused."""

    max_retries: int = Field(default=3, ge=0, le=20)
    """Retries of one request after a transient error (connection, timeout, 408, 409, 429, 5xx)."""

    retry_max_wait_s: float = Field(default=30.0, ge=0)
    """The longest single wait between retries, including a server's ``Retry-After``."""

    max_repairs: int = Field(default=2, ge=0, le=10)
    """Re-asks of a structured answer that fails validation, showing the model its error."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature of every call."""

    direct_instructions: str | None = Field(default=None, min_length=1)
    """The system message of a direct answer (and of ``apr bench``'s sequential baseline);
    ``None``: ``prompts.DIRECT_SYSTEM``, which leaves the model to decide how much to reason."""

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
    """Prompt + completion tokens for the whole run. When spent, nothing new starts, running
    threads are cancelled, and the answer is built from what finished (marked incomplete)."""

    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds for the whole run, with the same behaviour as ``token_budget`` when reached."""

    max_replacements: int = Field(default=1, ge=0, le=10)
    """Fresh attempts, with a different approach, for a thread that fails verification or
    reports a dead end."""

    stop_loops: bool = True
    """Stop a streamed reply (a thread, the plan, the merge, a direct answer) where it starts
    repeating itself (the same block of words back to back, or one sentence said a fifth
    time; ``apr_graph.loops``): the
    request is closed, the text before the loop is kept, and the thread is marked
    ``looped``. A loop is not a thread that needs more room: it is never retried with more."""

    retry_loops: bool = True
    """Give a thread that looped before saying much (less than an eighth of its allowance)
    one fresh attempt at the same allowance, told it repeated itself, when the run's token
    budget has room for it and its deadline has not passed. A thread that looped after a
    real answer keeps that answer: another attempt would lengthen the run's critical path."""

    stop_copy_lines: int = Field(default=12, ge=0)
    """Stop a thread's reply once it writes one of its documents out again from the top and
    this many lines in a row are unchanged (a "revised file" that only copies), or copies
    three times as many lines of its input from anywhere else (a quote that runs on); keep
    what came before the copy: the reader has those lines. It is recorded as ``looped`` (with
    ``copied_lines``) and never retried with more room. Not watched when the task or the
    thread's goal asks for documents changed or quoted (fix, rewrite, add, extract, quote,
    show, ...: ``loops.asks_for_input_text``), where the copy is the answer. Threads without
    tools only: a direct answer is the user's own request, and a merge quotes its threads.
    0: never."""

    min_thread_tokens: int = Field(default=256, ge=16)
    """The smallest output allowance the plan may give one thread. Planners guess low (a
    1.5B model gave a two-number multiplication 100 tokens, and its worked answer was cut
    there); 256 holds a short worked answer of a small model, and a thread that is still cut
    off is continued once from where it stopped."""

    vote_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    """Temperature of the repeated attempts when a plan lists the same goal several times
    (they become a vote): identical requests at temperature 0 give identical answers."""

    native: Literal["threadweaver", "multiverse"] | None = None
    """For models trained to write their own parallel blocks: stream their reasoning through
    the completions API and fork one request per outline (see ``apr_graph.nodes.native``)."""

    native_prompt: str | None = None
    """The raw prompt of a native run; ``None``: the one the model was trained on (its chat
    template and training cue, see ``apr_graph.native.FORMATS``). ``{task}`` is the task and
    ``{context}`` the context after a blank line (empty without one)."""

    native_max_tokens: int = Field(default=8000, ge=16)
    """Tokens one chain of a native run (the main reasoning or one thread) may generate, over
    all its requests; 8,000 as in Multiverse's engine. A thread that reaches it is closed and
    recorded as ``cancelled``."""

    native_skip_special_tokens: bool = False
    """Sent as ``skip_special_tokens``. Both models' tags are added special tokens, which
    vLLM and SGLang drop from the output by default: then no stop string matches and nothing
    forks. Both reference engines send ``false``."""

    native_stop_token_ids: dict[str, int] = Field(default_factory=dict)
    """Token ids of the tags the run stops at (e.g. ``{"</Goal>": 151670, "</Path>": 151674}``
    for Multiverse-32B), sent as ``stop_token_ids`` beside the stop strings, as both reference
    engines do; for servers that take them (vLLM, SGLang)."""

    native_require_tags: bool | None = None
    """Raise ``NativeProtocolError`` when a native run's text has none of the model's tags
    (the sign of a server that drops special tokens). ``None``: yes for ``multiverse`` (its
    model always opens ``<Think>``), no for ``threadweaver`` (its model may answer without a
    block, and Qwen3's ``<think>`` survives the dropping)."""

    probe_capacity: bool = True
    """Ask the server once how many requests it runs at once (llama.cpp ``/props`` or
    ``/slots``, vLLM ``/metrics``) and size the concurrency to it; an explicit
    ``max_concurrency`` still caps it. Servers that do not say keep the settings."""

    stream_plan: bool = True
    """Start each thread as soon as its subtask is complete in the planner's streamed reply,
    instead of after the whole plan. A thread started early is kept only if the final,
    repaired plan gives it exactly the same request; otherwise it is cancelled and run again."""

    label_goals: bool = True
    """When the task labels its parts ((a), (b) ... or 1., 2. ...), a parallel plan names each
    subtask by its label instead of writing it out, and its thread is given that part's text:
    the plan is shorter, so every thread starts sooner (a 1.5B planner: ~70 -> 42 tokens for
    three parts). The schema then allows only those labels as goals, so turn it off where the
    labels mark data rather than parts to solve; off, the planner writes every goal."""

    warm_prefix: bool = False
    """Before a fan-out, send one tiny request with the threads' shared prefix, so the server's
    prefix cache holds it when the threads arrive."""

    thread_documents: Literal["named", "all"] = "named"
    """When the context is named documents (``{"task": ..., "context": {"calc.py": "..."}}``):
    ``named`` gives a thread only the documents its goal names (the whole context when it
    names none, or all of them), ``all`` gives every thread the whole context. A thread that
    reviews one of three files then reads one file, not three: on a CPU server, where every
    thread reads its prompt itself, that is most of a fan-out's time; a thread does not see
    what other documents say about its own (use ``all`` when the parts depend on each other).
    The plan, the merge and a direct answer always read every document."""

    plan_documents: bool = True
    """A task that maps over its documents, its labelled parts each naming one of them
    ("Review (a) calc.py (b) io.py (c) db.py", the files as the context's documents) and
    asking nothing across them (no comparison, ranking or combined answer), is planned
    without a model call: one thread per part, reading its own document, results shown
    under their labels (merge ``concat`` unless ``merge`` is set). On a 2-CPU server the
    planning call it saves is ~12 s of a ~78 s review of three files; the decision on
    whether to fork is made as for a model's plan. Off, with tools, or with a ``merge`` of
    attempts at one question (``vote``, ``race``, ``best``), the planner plans it."""

    planner_document_chars: int | None = Field(default=600, ge=0)
    """With a context of named documents, the planner reads each document's name, size and
    first ``planner_document_chars`` characters (``None``: all of it): it decides and splits
    by what the documents are, and reading them whole would put their prefill before the
    first thread (on 2 CPU cores, 13 s for three files of 1.6 KB). A planner that read only a
    part does not answer itself: a direct answer is one call that reads every document."""

    max_tool_calls: int = Field(default=4, ge=0, le=64)
    """Tool calls one thread may make (with ``create_apr_graph(tools=...)``)."""

    stream_tokens: bool = False
    """Emit a ``token`` custom event for every piece of every thread's answer."""

    on_thread_error: Literal["tolerate", "fail"] = "tolerate"
    """A thread that still fails after retries: ``tolerate`` records it as failed, lets its
    siblings finish and tells the merge which subtasks failed; ``fail`` ends the run."""

    prefer: Literal["speed", "quality"] = "speed"
    """What a fork must buy. ``speed``: fork only where the plan is predicted to finish before
    one direct call on this endpoint (from its speed profile: ``apr calibrate``, or learned
    from earlier runs; with no profile yet, fork as the task and plan say). ``quality``: fork
    whenever the task splits into independent parts, whatever the server (shorter contexts
    per part, at the price of time on servers that batch poorly)."""

    router: bool = True
    """Read a top-level task with the shipped router (``apr_graph.router``, learned from public
    labelled prompts) before planning: a task that reads as one continuous piece (a story, one
    explanation, one word problem whose steps need each other) is answered by one call, with
    no planning call. Off: the planner model alone decides (small models split nearly
    everything)."""

    speed_file: str | None = None
    """The JSON file of measured endpoint speeds (``apr calibrate``, and each run's own calls);
    ``None``: ``$APR_SPEED_FILE``, else ``~/.cache/apr-graph/speed.json``; ``""``: keep them
    in memory only."""

    learn_speed: bool = True
    """Update the endpoint's speed profile from each finished run's calls."""

    structured_output: Literal["auto", "json_schema", "json_object", "prompt"] = "auto"
    """How to ask for JSON: ``auto`` tries ``json_schema``, then ``json_object`` with a schema,
    then the schema in the prompt, and remembers per endpoint what worked."""

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
        override = {
            "planner": self.planner_model,
            "worker": self.worker_model,
            "synthesizer": self.synthesizer_model,
        }.get(role)
        return override or self.model

    def max_tokens_for(self, role: Role | str) -> int:
        """The output-token allowance of one call of ``role`` (others: ``worker_max_tokens``)."""
        return {
            "planner": self.planner_max_tokens,
            "worker": self.worker_max_tokens,
            "synthesizer": self.synthesizer_max_tokens,
        }.get(role, self.worker_max_tokens)
