"""hub/service.py holds no SQL of its own (issue 9, "one module that holds all SQL"): every
statement it sends is built in hub/store/. Checked on its source: it imports no statement
constructor from sqlalchemy and calls no session or connection statement method."""

import ast
from pathlib import Path

import gridswarm.hub.service as service

# what service.py may still name from sqlalchemy: types, exceptions, the session factory
ALLOWED = {"Engine", "Session", "sessionmaker", "IntegrityError", "ResourceClosedError"}
# session / connection methods that send or stage a statement (dict.get and set.add excluded)
STATEMENT_CALLS = {"execute", "scalar", "scalars", "add_all", "merge", "flush", "query"}


def test_service_imports_no_sql_constructor_and_sends_no_statement_itself() -> None:
    tree = ast.parse(Path(service.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy")
        for alias in node.names
    }
    assert imported <= ALLOWED, imported - ALLOWED
    calls = [
        (node.lineno, node.func.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in STATEMENT_CALLS
    ]
    assert calls == []
    # `s.get(m.X, ...)` / `s.add(row)` on a session (dicts and sets may still get and add)
    session_rows = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"get", "add", "delete"}
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in {"s", "session", "conn"}
    ]
    assert session_rows == []
