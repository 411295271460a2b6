"""The pipeline grammar: parse and print.

::

    pipeline := item ("," item)*
    item     := NAME [ "(" [ arg ("," arg)* ] ")" ]
    arg      := KEY "=" value  |  item          (a nested item: for fixpoint(...) groups)
    value    := WORD | QUOTED | "[" [ value ("," value)* ] "]"

``NAME``/``KEY``/``WORD`` are runs of letters, digits and ``_-.:+/``; ``QUOTED`` is a
single- or double-quoted string with backslash escapes. Whitespace between tokens is
ignored. Example: ``fuse,ptq(bits=8,calib=entropy),prune(heads=0.25)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import PipelineSyntaxError

_WORD_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:+/*")


@dataclass
class PipelineItem:
    """One parsed element of a pipeline.

    Attributes:
        name: The pass or pipeline name.
        options: ``k=v`` values (strings, or lists of strings).
        children: Nested items, for group passes such as ``fixpoint``.
        column: 1-based column of the name in the text.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    children: list[PipelineItem] = field(default_factory=list)
    column: int = 1


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, (self.pos if pos is None else pos) + 1)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.pos += 1

    def word(self, what: str) -> str:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _WORD_CHARS:
            self.pos += 1
        if start == self.pos:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        return self.text[start : self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == quote:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.error("unterminated string", start)

    def value(self) -> Any:
        ch = self.peek()
        if ch in ("'", '"'):
            return self.quoted()
        if ch == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        return self.word("a value")

    def item(self) -> PipelineItem:
        self.skip_ws()
        column = self.pos + 1
        name = self.word("a pass name")
        node = PipelineItem(name=name, column=column)
        if self.peek() != "(":
            return node
        self.pos += 1
        if self.peek() == ")":
            self.pos += 1
            return node
        while True:
            self.skip_ws()
            save = self.pos
            key = self.word("an option or pass name")
            if self.peek() == "=":
                self.pos += 1
                if key in node.options:
                    raise self.error(f"option {key!r} given twice", save)
                node.options[key] = self.value()
            else:
                self.pos = save
                node.children.append(self.item())
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect(")")
            return node

    def pipeline(self) -> list[PipelineItem]:
        if not self.text.strip():
            raise self.error("empty pipeline", 0)
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r}")
        return items


def parse_pipeline(text: str) -> list[PipelineItem]:
    """Parses pipeline text into items.

    Raises:
        PipelineSyntaxError: With the 1-based column of the problem.
    """
    return _Parser(text).pipeline()


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c in _WORD_CHARS for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_item(item: PipelineItem) -> str:
    """Prints one item back to canonical text."""
    parts = [format_item(c) for c in item.children]
    parts += [f"{k}={_format_value(v)}" for k, v in item.options.items()]
    return f"{item.name}({','.join(parts)})" if parts else item.name


def format_pipeline(items: list[PipelineItem]) -> str:
    """Prints items back to canonical text (``parse(format(x)) == x``)."""
    return ",".join(format_item(i) for i in items)
