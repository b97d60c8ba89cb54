"""Text that JSON can spell but no UTF-8 text can hold, and showing client values in error messages safely.

JSON's \\uXXXX escapes can write a lone surrogate ("\\ud800"); Python's json module keeps it in a str, pydantic lets it
through most str fields, and then the tokenizer raises, or the response that quotes it cannot be encoded: a 500 for a
client's mistake. The request bodies refuse such text up front (422), naming where it is.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

SHOWN_CHARS = 200  # a client value quoted in an error message is cut to this many characters


def utf8_safe(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate is written as its escape (\\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def shown(value: Any) -> str:
    """repr(value) for an error message: at most SHOWN_CHARS characters, and safe for any JSON value (however long or
    deeply nested, lone surrogates escaped)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return utf8_safe(text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "...")


def _invalid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(where, text) of the first string in a JSON-like value (keys included) that is not valid Unicode, else None.
    `where` is a dotted path such as messages.0.content."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _invalid(item):
                return where, item
        elif isinstance(item, dict):
            for key, child in item.items():
                name = str(key)
                if _invalid(name):
                    return where, name
                stack.append((f"{where}.{name}" if where else name, child))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}.{i}" if where else str(i), child) for i, child in enumerate(item))
    return None


class ValidText(BaseModel):
    """A request body whose every string (at any depth, keys included) must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = lone_surrogate(data)
        if found is not None:
            where, text = found
            raise ValueError(f"{where or 'value'}: text must be valid Unicode, got a lone surrogate in {shown(text)}")
        return data
