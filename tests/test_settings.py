"""AprSettings: defaults, environment, validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from apr_graph import AprSettings


def test_defaults() -> None:
    settings = AprSettings()
    assert settings.base_url is None
    assert settings.max_threads == 8
    assert settings.model_for("worker") == "default"


def test_reads_openai_and_apr_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-box:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("APR_MAX_THREADS", "3")
    monkeypatch.setenv("APR_WORKER_MODEL", "small")
    monkeypatch.setenv("BASE_URL", "http://not-ours/v1")  # an unrelated variable
    settings = AprSettings(model="big")
    assert settings.base_url == "http://gpu-box:8000/v1"
    assert settings.api_key.get_secret_value() == "sk-env"
    assert settings.max_threads == 3
    assert settings.model_for("worker") == "small"
    assert settings.model_for("planner") == "big"


def test_apr_base_url_wins_over_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai-var/v1")
    monkeypatch.setenv("APR_BASE_URL", "http://apr-var/v1")
    assert AprSettings().base_url == "http://apr-var/v1"


def test_key_is_hidden_in_repr() -> None:
    settings = AprSettings(api_key="sk-hidden-value")
    assert "sk-hidden-value" not in repr(settings)
    assert "sk-hidden-value" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_threads", 0, "greater than or equal to 1"),
        ("base_url", "localhost:8000", "must start with http"),
        ("model", " ", "must not be empty"),
        ("max_thread", 3, "Extra inputs are not permitted"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        AprSettings(**{field: value})
