"""Stored runs from the command line: ``apr runs`` lists them, ``apr resume`` checks the id
before it starts anything."""

from __future__ import annotations

from pathlib import Path

from apr_graph.testing import Reply, Rule
from tests.conftest import CliRunner, ServerFactory


def test_runs_lists_stored_runs_and_resume_refuses_an_unknown_id_at_once(
    run_cli: CliRunner, make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server(
        [Rule(role="planner", reply=Reply(content={"strategy": "direct", "answer": "4"}))]
    )
    db = tmp_path / "runs.sqlite"
    connection = ["--base-url", server.base_url, "--model", "test-model", "--db", str(db)]
    done = run_cli("ask", *connection, "--thread-id", "job-1", "-q", "What is 2 + 2?")
    assert (done.code, done.out.strip()) == (0, "4")

    listed = run_cli("runs", "--db", str(db))
    assert listed.code == 0
    assert "job-1" in listed.out
    assert "finished" in listed.out
    assert "What is 2 + 2?" in listed.out

    sent = len(server.requests)
    unknown = run_cli("resume", "nope", "--db", str(db))
    assert unknown.code == 2
    assert "no run is stored under thread id 'nope'" in unknown.err
    assert "job-1" in unknown.err  # the stored ids are listed
    assert len(server.requests) == sent  # nothing was asked of any server


def test_runs_on_a_missing_file_says_there_are_none(run_cli: CliRunner, tmp_path: Path) -> None:
    listed = run_cli("runs", "--db", str(tmp_path / "none.sqlite"))
    assert (listed.code, listed.out.strip()) == (0, "no stored runs")
