"""Validation of chat ``messages`` before any I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigurationError


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and return it as a list of plain dicts.

    Each message is a mapping with a non-empty string ``role`` and a ``content`` that is a string or
    a list of content parts (mappings). ``content`` may be ``None`` only on a message that carries
    ``tool_calls`` (an assistant's tool call).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise _invalid(
            f"messages must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}"
        )
    if not messages:
        raise _invalid("messages must not be empty")
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise _invalid(
                f"{where} must be a mapping with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _invalid(f"{where}['role'] must be a non-empty string, got {role!r}")
        if "content" not in message:
            raise _invalid(f"{where} has no 'content'")
        content = message["content"]
        if content is None:
            if not message.get("tool_calls"):
                raise _invalid(f"{where}['content'] is None (allowed only with 'tool_calls')")
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise _invalid(
                        f"{where}['content'][{part_index}] must be a content part mapping with a 'type'"
                    )
        elif not isinstance(content, str):
            raise _invalid(
                f"{where}['content'] must be a string or a list of content parts, got {type(content).__name__}"
            )
        checked.append(dict(message))
    return checked


def _invalid(message: str) -> ConfigurationError:
    return ConfigurationError(message, param="messages")
