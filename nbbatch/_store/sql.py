"""Quoting names and literals for SQL text; the one way user data reaches the text of a query.

Values go into queries as bound parameters (``?``). Identifiers (output keys, table and view
names) and the few literals DuckDB does not accept as parameters (the target of ``COPY ... TO``)
cannot be bound, so they are quoted here, and ``tests/unit/test_sql_identifiers.py`` fails when a
module splices anything else into SQL text. Must not import anything from nbbatch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ident", "literal", "type_name"]


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier: wrapped in double quotes, embedded ``"`` doubled.

    Any string is a valid column or table name this way, keywords, spaces, quotes and ``;``
    included; DuckDB still matches identifiers ignoring case, so callers keep names unique by
    ``str.casefold`` on their own.

    Args:
        name: the identifier, exactly as the column or table should be named.

    Returns:
        The quoted identifier.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is empty or holds a NUL character (no SQL engine stores those).

    Example:
        >>> print(ident('say "hi" now'))
        "say ""hi"" now"
    """
    if not isinstance(name, str):
        raise TypeError(f"an SQL identifier must be a string, got {type(name).__name__}")
    if not name or "\x00" in name:
        raise ValueError(f"an SQL identifier must be a non-empty string without NUL characters, got {name!r}")
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """``text`` as a quoted SQL string literal (single quotes, embedded ``'`` doubled).

    Only for places where DuckDB takes no bound parameter, e.g. the file of ``COPY ... TO``.

    Example:
        >>> literal("it's.parquet")
        "'it''s.parquet'"
    """
    if "\x00" in text:
        raise ValueError(f"an SQL string literal cannot hold NUL characters, got {text!r}")
    return "'" + text.replace("'", "''") + "'"


def type_name(con: Any, text: str) -> str:
    """``text`` if it is exactly a DuckDB type (as ``DESCRIBE`` renders one), else ValueError.

    Column types of new output keys come from DuckDB itself (``DESCRIBE`` of the Arrow rows), and
    DuckDB quotes nested field names in them; parsing the text back as a type makes sure it can
    only ever be a type in ``ALTER TABLE ... ADD COLUMN``.

    Args:
        con: a DuckDB connection (its parser checks the text).
        text: the type, e.g. ``FLOAT[8]`` or ``STRUCT("a b" BIGINT)``.
    """
    try:
        parsed = str(con.type(text))
    except Exception as exc:  # DuckDB raises several classes for unparsable types
        raise ValueError(f"{text!r} is not a DuckDB type") from exc
    if parsed != text:
        raise ValueError(f"{text!r} is not a DuckDB type as DuckDB writes it (it reads back as {parsed!r})")
    return text
