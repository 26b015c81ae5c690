"""JSON schemas as clients send them (an object, or its text) turned into checked schema text.

The grammar compiler's time grows steeply with nesting (xgrammar: 0.02 s at 32 nested objects, 1.7 s
at 256, minutes at 1,000) and Python's json recurses, so a schema's nesting is bounded before either
sees it. OpenAI's structured outputs allow 10 levels of nested objects; the bound here is far above.
No xgrammar import: the API process checks schemas with this module alone.
"""

from __future__ import annotations

import json
from typing import Any

# JSON objects and arrays nested in one schema document (an object property costs two: the
# "properties" object and the property's own schema)
MAX_SCHEMA_DEPTH = 64


class GrammarError(ValueError):
    """An invalid grammar spec. The message starts with the field at fault ("json_schema: ...")."""


def json_depth(value: Any) -> int:
    """How deeply objects and arrays nest in value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list | tuple):
            items = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            break  # enough to refuse it
        stack.extend((child, depth) for child in items)
    return deepest


def _too_deep(field: str) -> GrammarError:
    return GrammarError(f"{field}: the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels "
                        "deep; this server compiles schemas up to that depth")


def check_schema_value(value: Any, field: str = "json_schema") -> None:
    """Refuse a parsed schema nested past MAX_SCHEMA_DEPTH."""
    if json_depth(value) > MAX_SCHEMA_DEPTH:
        raise _too_deep(field)


def schema_text(value: Any, field: str = "json_schema") -> str:
    """A schema given as an object (or text) as checked JSON text."""
    if isinstance(value, str):
        parse_schema(value, field)
        return value
    check_schema_value(value, field)
    return json.dumps(value)


def parse_schema(text: str, field: str = "json_schema") -> Any:
    """The schema text parsed and checked (json recurses: a very deep text is refused, not a crash)."""
    try:
        schema = json.loads(text)
    except RecursionError:
        raise _too_deep(field) from None
    except json.JSONDecodeError as e:
        raise GrammarError(f"{field}: invalid JSON: {e}") from e
    check_schema_value(schema, field)
    return schema
