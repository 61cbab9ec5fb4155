"""Issue 9's layering rule, checked on the source: every SQL statement the hub sends is built in
`hub/store/` (with the schema in `hub/models.py` and `hub/migrations/`). Elsewhere in `hub/` no
module imports a statement constructor from sqlalchemy, nor calls a query method on a session or
connection. An AST walk, no import of the hub: it reads each file's syntax only."""

from __future__ import annotations

import ast
from pathlib import Path

HUB = Path(__file__).resolve().parent.parent / "src" / "gridswarm" / "hub"
# where SQL may be built: the storage layer, the schema and its migrations
ALLOWED = ("store/", "models.py", "migrations/")
# modules a statement constructor is imported from
SQL_MODULES = {"sqlalchemy", "sqlalchemy.sql", "sqlalchemy.sql.expression"}
# statement and clause constructors (types such as Session, Engine, Row, ColumnElement, and the
# exception classes, may be imported anywhere)
SQL_CONSTRUCTORS = {
    "select", "insert", "update", "delete", "func", "text", "bindparam", "and_", "or_", "not_",
    "case", "exists", "literal", "literal_column", "tuple_", "union", "union_all", "intersect",
    "intersect_all", "except_", "except_all", "column", "table", "values", "cast", "null",
    "true", "false", "desc", "asc", "distinct", "join", "outerjoin", "lateral", "alias",
    "any_", "all_", "between", "extract", "over", "type_coerce", "nulls_first", "nulls_last",
}  # fmt: skip
# what a session or connection sends statements with, and the names the hub gives them
QUERY_METHODS = {
    "execute", "scalar", "scalars", "get", "add", "add_all", "delete", "merge", "flush", "query",
}  # fmt: skip
RECEIVERS = {"s", "session", "conn", "connection"}


def receiver_name(node: ast.expr) -> str | None:
    """`s` of `s.execute(...)`, `conn` of `self.conn.execute(...)`; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def offenders(source: str) -> list[tuple[int, str]]:
    """(line, what) of each SQL constructor import and each session/connection query call."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in SQL_MODULES and node.level == 0:
            for alias in node.names:
                if alias.name in SQL_CONSTRUCTORS or alias.name == "*":
                    found.append((node.lineno, f"imports {alias.name} from {node.module}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in QUERY_METHODS
            and receiver_name(node.func.value) in RECEIVERS
        ):
            found.append((node.lineno, f"calls {receiver_name(node.func.value)}.{node.func.attr}"))
    return sorted(found)


def hub_modules() -> dict[str, Path]:
    """Every hub module outside the storage layer, the schema and its migrations, by its path
    relative to hub/."""
    modules = {}
    for path in sorted(HUB.rglob("*.py")):
        relative = path.relative_to(HUB).as_posix()
        if not relative.startswith(ALLOWED):
            modules[relative] = path
    return modules


def test_the_check_finds_what_it_looks_for_and_nothing_else():
    source = (
        "from sqlalchemy import Engine, select, func as f\n"
        "from sqlalchemy.exc import IntegrityError\n"
        "from sqlalchemy.orm import Session\n"
        "def read(s, cache, self):\n"
        "    cache.get('k')\n"
        "    s.execute(q)\n"
        "    self.conn.execute(q)\n"
        "    s.commit()\n"
        "    session.get(Model, 1)\n"
    )
    assert offenders(source) == [
        (1, "imports func from sqlalchemy"),
        (1, "imports select from sqlalchemy"),
        (6, "calls s.execute"),
        (7, "calls conn.execute"),
        (9, "calls session.get"),
    ]


def test_sql_is_built_only_in_the_store():
    modules = hub_modules()
    assert {"app.py", "service.py", "trust.py", "privacy.py"} <= set(
        modules
    )  # the walk sees the hub
    found = {name: offenders(path.read_text()) for name, path in modules.items()}
    stray = [f"hub/{name}:{line}: {what}" for name, lines in found.items() for line, what in lines]
    assert not stray, "SQL outside hub/store/ (move it into a store module):\n" + "\n".join(stray)
