"""Checks before a run: is the model name one the server serves, and is the URL its API?

A listing decides nothing (llama.cpp serves its one model under any name; a proxy may route
names it does not list): only the server's own "unknown model" answer refuses a name. A base
URL that 404s where ``URL/v1`` answers is missing ``/v1``; the error says so.
"""

from __future__ import annotations

from apr_graph.errors import (
    AuthenticationError,
    ModelCallError,
    ModelNotFoundError,
    ServerUnreachableError,
)
from apr_graph.http_pool import get_once
from apr_graph.llm import LLMClient

__all__ = ["check_server", "unknown_model_message"]

_SHOWN = 5
"""The most offered names an error lists: a proxy's catalogue has hundreds."""


def unknown_model_message(url: str, model: str, offered: list[str]) -> str:
    """The message for a model name the server does not serve, naming at most five of the
    names it offers."""
    listing = ", ".join(offered[:_SHOWN]) if offered else "(the server lists none)"
    if len(offered) > _SHOWN:
        listing += f" and {len(offered) - _SHOWN} more"
    return (
        f"the server at {url} does not serve model {model!r}; it offers: {listing} "
        "(choose one with --model)"
    )


async def check_server(client: LLMClient) -> list[str]:
    """Check the server before a run; returns warnings to show, raises what cannot work.

    A configured name the server does not list is not refused here: the run tries it.

    Raises:
        ServerUnreachableError: the URL is not the API (e.g. ``/v1`` is missing).
    """
    settings, url = client.settings, client.base_url
    try:
        offered = await client.list_models()
    except ModelNotFoundError as exc:
        v1 = url.rstrip("/") + "/v1"
        if not url.rstrip("/").endswith("/v1"):
            (models,) = await get_once([v1 + "/models"], settings.api_key.get_secret_value())
            if not isinstance(models, BaseException):  # a failed status is not the API either
                raise ServerUnreachableError(
                    f"{url} has no OpenAI API (HTTP 404), but {v1} answers: "
                    f"add /v1 to the base URL (--base-url {v1})",
                    url=url,
                ) from exc
        return []  # a server without /models can still serve completions
    except (AuthenticationError, ServerUnreachableError):
        raise
    except ModelCallError:
        return []  # the listing failed; the run itself will say what is wrong
    names = dict.fromkeys(settings.model_for(r) for r in ("planner", "worker", "synthesizer"))
    missing = [name for name in names if name not in offered]
    if offered and missing and (await client.capacity_report())["source"].startswith("llama.cpp"):
        return [
            f"apr: warning: {url} is llama.cpp, which serves {offered[0]!r} whatever the "
            f"model name: {', '.join(map(repr, missing))} is ignored"
        ]
    return []  # a proxy routes names it does not list: the first request will tell
