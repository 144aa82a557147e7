"""The ``/`` filter and the sort order of the dashboard's tables, on the text of their cells (pure Python).

A filter is words, all of which a row must match (case does not matter):

- ``node1`` : some cell of the row contains it (hidden columns count: a narrow terminal filters like a wide one);
- ``status:failed``, ``sev:error``, ``node:node1``, ``kind:crash`` : that column contains it (a column is named by
  its key or its label: ``sev`` and ``severity`` both work); a number against a number column is compared whole,
  so ``rank:3`` is rank 3, not 13;
- ``-word`` or ``-status:running`` : the row must not match it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Term:
    column: str | None
    """The column's key or label (lower case); None: any column."""
    text: str
    negated: bool


def parse_filter(query: str) -> list[Term]:
    terms = []
    for word in query.lower().split():
        negated = word.startswith("-") and len(word) > 1
        word = word[1:] if negated else word
        column, _, text = word.partition(":")
        if not text:  # "word" or "word:" (still typing)
            column, text = "", column
        if text:
            terms.append(Term(column or None, text, negated))
    return terms


def row_matches(cells: Mapping[str, str], terms: Sequence[Term], aliases: Mapping[str, str] | None = None) -> bool:
    """Whether a row (column key -> its cell's text) matches every term. ``aliases`` maps other names (labels)
    of a column to its key."""
    # A term holds when the row matches it, or, negated, when it does not.
    return all(_matches(cells, term, aliases or {}) != term.negated for term in terms)


def _matches(cells: Mapping[str, str], term: Term, aliases: Mapping[str, str]) -> bool:
    if term.column is None:
        return any(term.text in value.lower() for value in cells.values())
    key = term.column if term.column in cells else aliases.get(term.column)
    if key is None:
        # Not a column of this table (a status word in the events table): the row cannot match it.
        return False
    value = cells.get(key, "").lower()
    if _NUMBER.fullmatch(term.text) and _NUMBER.fullmatch(value.strip()):
        return value.strip().replace(",", "") == term.text.replace(",", "")
    return term.text in value


def sort_value(text: str) -> tuple[int, float, str]:
    """The order of a cell: numbers (``1,234``, ``26.0%!``, ``406 ms``) by value, then words, then empty cells
    and ``-`` last whichever way the table is sorted by the caller (see ``sort_rows``)."""
    stripped = text.strip()
    if not stripped or stripped == "-":
        return (2, 0.0, "")
    number = _NUMBER.match(stripped)
    if number is not None:
        return (0, float(number.group().replace(",", "")), stripped.lower())
    return (1, 0.0, stripped.lower())


def sort_rows(rows: Sequence[tuple[str, Mapping[str, str]]], column: str, descending: bool) -> list[str]:
    """The keys of ``rows`` (key, column key -> text) ordered by ``column``; empty cells last either way."""
    values = {key: sort_value(cells.get(column, "")) for key, cells in rows}
    present = [key for key, _ in rows if values[key][0] < 2]
    missing = [key for key, _ in rows if values[key][0] == 2]
    # A stable sort: rows that tie keep the table's own order.
    present.sort(key=lambda key: values[key], reverse=descending)
    return present + missing
