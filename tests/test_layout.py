"""The package's layout: what issue 32 asks of its modules."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "apr_graph"
MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50  # the package was found
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_nodes_live_inside_the_package() -> None:
    """Not a top-level ``nodes`` package: that import name collides with other projects."""
    assert (PACKAGE / "nodes" / "__init__.py").is_file()
    assert not (PACKAGE.parent / "nodes").exists()


def test_the_public_names_are_listed_once_each_and_all_import() -> None:
    import apr_graph

    assert apr_graph.__all__ == sorted(set(apr_graph.__all__))
    assert set(apr_graph.__all__) == set(apr_graph._WHERE)
    assert all(getattr(apr_graph, name) is not None for name in apr_graph.__all__)
