"""A ``.json`` file read as one JSON document in bounded memory.

:func:`iter_document_rows` yields the elements of a top-level array one at a time, as they are
parsed from a binary file read in chunks (decoded as UTF-8 a chunk at a time, a leading byte
order mark dropped); any other document (an object, a scalar) is one value, parsed whole and
turned into rows by the caller's ``rows_of``. Only the text of the element being parsed is held,
so a file of any number of rows is read in the memory of its largest row.

It accepts and refuses exactly what ``json.loads`` on the whole file does: each element goes
through the same decoder (``json.JSONDecoder.raw_decode``), the array's commas and brackets are
checked with ``json``'s own messages, and an error carries the line and column ``json.loads``
gives. The file is always read to its end, whatever the caller keeps, so that it is accepted or
refused as a whole (bytes that are not UTF-8 anywhere are the error, as when it is decoded
whole). A file that is not one document raises :class:`NotOneDocument`, which also says whether
the file's first non-blank line is JSON by itself (then the file may be JSON lines).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from json.decoder import WHITESPACE

# Bytes read at a time (more while one value is longer than the text held).
CHUNK_BYTES = 1 << 20
# An error or a value this close to the end of the text held may come from where the reading
# stopped, not from the file: json reads up to 9 characters (``-Infinity``) of a token before
# failing, and a number's end may be followed by the start of its fraction or exponent (``1e``).
NEAR_END = 16


class NotOneDocument(Exception):
    """The file does not parse as one JSON document: the error ``json.loads`` gives for it.

    Attributes:
        line: the 1-based line of the error.
        column: json's 1-based column of a JSON error (None for bytes that are not UTF-8).
        msg: json's message (``Expecting value``, ...); None for bytes that are not UTF-8.
        bad_bytes: the first bytes that are not UTF-8 (None for a JSON error).
        first_line_alone: whether the file's first non-blank line is JSON by itself.
    """

    def __init__(self, line, column=None, msg=None, bad_bytes=None, *, first_line_alone: bool):
        super().__init__(f"line {line}: {msg or bad_bytes}")
        self.line, self.column, self.msg, self.bad_bytes = line, column, msg, bad_bytes
        self.first_line_alone = first_line_alone


class _SyntaxError(Exception):
    """json's error at a place in the file: its message, 1-based line and column."""

    def __init__(self, msg: str, line: int, column: int):
        super().__init__(msg)
        self.msg, self.line, self.column = msg, line, column


class _Text:
    """The UTF-8 text of a binary file, read chunk by chunk, and the part not parsed yet.

    ``buf[pos:]`` is the text not parsed yet; ``line`` and ``col`` place ``buf[0]`` in the file
    (its 1-based line, the characters before it on that line); ``breaks`` counts the line
    breaks (``\\n``, ``\\r``) dropped before ``buf[0]``. Bytes that are not UTF-8 end the text
    where they start (``bad``: their error, ``bad_line``: their line), as if the file ended.
    """

    def __init__(self, f, chunk_bytes: int):
        self.f, self.chunk_bytes = f, chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line, self.col, self.breaks = "", 0, 1, 0, 0
        self.newlines_decoded = 0
        self.eof, self.started = False, False
        self.bad: UnicodeDecodeError | None = None
        self.bad_line = 0

    def read_more(self) -> None:
        """Append the next chunk's text (at least as much as is held), dropping what is parsed."""
        self._drop_parsed()
        data = self.f.read(max(self.chunk_bytes, len(self.buf), 3))
        self.eof = not data
        if not self.started:
            self.started, data = True, data.removeprefix(codecs.BOM_UTF8)
        try:
            text = self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as err:
            text = err.object[: err.start].decode("utf-8")
            self.bad, self.eof = err, True
            self.bad_line = self.newlines_decoded + text.count("\n") + 1
        self.newlines_decoded += text.count("\n")
        self.buf += text

    def _drop_parsed(self) -> None:
        if self.pos < len(self.buf) // 2 and self.pos < self.chunk_bytes:
            return
        done = self.buf[: self.pos]
        last = done.rfind("\n")
        self.line += done.count("\n")
        self.col = self.col + len(done) if last < 0 else len(done) - last - 1
        self.breaks += done.count("\n") + done.count("\r")
        self.buf, self.pos = self.buf[self.pos :], 0

    def breaks_before(self, pos: int) -> int:
        """Line breaks in the file's text before ``buf[pos]``."""
        return self.breaks + self.buf.count("\n", 0, pos) + self.buf.count("\r", 0, pos)

    def next_char(self) -> str:
        """The first character after whitespace (``pos`` moved onto it), or "" at the end."""
        while True:
            self.pos = WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self.read_more()

    def value(self, decoder: json.JSONDecoder):
        """The JSON value at ``pos`` (moved past it), reading on while it may go on."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                near_end = err.pos >= len(self.buf) - NEAR_END
                if self.eof or not (near_end or err.msg.startswith("Unterminated string")):
                    raise self.error(err.msg, err.pos) from None
                self.read_more()
                continue
            if end < len(self.buf) - NEAR_END or self.eof:  # a number may go on: 1 -> 1e5
                self.pos = end
                return value
            self.read_more()

    def error(self, msg: str, pos: int) -> _SyntaxError:
        """json's error at ``buf[pos]``, with the line and column ``json.loads`` gives."""
        located = json.JSONDecodeError(msg, self.buf, pos)
        column = located.colno + (self.col if located.lineno == 1 else 0)
        return _SyntaxError(msg, self.line + located.lineno - 1, column)

    def drain(self) -> None:
        """Read the file to its end (its bytes that are not UTF-8, a corrupt gzip stream)."""
        while not self.eof:
            self.pos = len(self.buf)
            self.read_more()
        while self.f.read(self.chunk_bytes):
            pass


def iter_document_rows(
    f, rows_of: Callable[[object], list], *, chunk_bytes: int | None = None
) -> Iterator[object]:
    """The rows of the JSON document in the binary file ``f``: each element of a top-level
    array as it is parsed, else ``rows_of(value)`` of the one value. ``f`` is read
    ``chunk_bytes`` (None: ``CHUNK_BYTES``) at a time, more only while one value is longer.

    Raises:
        NotOneDocument: the file is not one JSON document (see the class).
        OSError, or what ``f``'s reading raises (a corrupt gzip stream).
    """
    text = _Text(f, chunk_bytes or CHUNK_BYTES)
    decoder = json.JSONDecoder()
    value_lines = None  # the line breaks before the first value's start and its end
    try:
        text.next_char()
        start = text.breaks_before(text.pos)
        is_array = text.buf[text.pos : text.pos + 1] == "["
        if is_array:
            text.pos += 1
            yield from _array_elements(text, decoder)
        else:
            value = text.value(decoder)
        value_lines = (start, text.breaks_before(text.pos))
        if text.next_char():
            raise text.error("Extra data", text.pos)
    except _SyntaxError as err:
        raise _not_one_document(text, err, value_lines) from None
    if text.bad is not None:
        raise _not_one_document(text, None, value_lines)
    if not is_array:
        yield from rows_of(value)


def _array_elements(text: _Text, decoder: json.JSONDecoder) -> Iterator[object]:
    """The elements of the array whose ``[`` is just before ``text.pos``, then past its ``]``:
    json's array scanner (its messages and places), one element at a time."""
    if text.next_char() == "]":
        text.pos += 1
        return
    while True:
        yield text.value(decoder)
        after = text.next_char()
        if after == "]":
            text.pos += 1
            return
        if after != ",":
            raise text.error("Expecting ',' delimiter", text.pos)
        text.pos += 1
        text.next_char()


def _not_one_document(text: _Text, err: _SyntaxError | None, value_lines) -> NotOneDocument:
    """The error ``json.loads`` gives for the whole file (bytes that are not UTF-8 anywhere in
    it come first), and whether its first non-blank line is JSON by itself: the first value
    starts and ends on one line and a line break follows it before anything else."""
    alone = value_lines is not None and (
        value_lines[0] == value_lines[1] < text.breaks_before(text.pos)
    )
    text.drain()
    if text.bad is not None:
        bad = text.bad.object[text.bad.start : text.bad.end]
        return NotOneDocument(text.bad_line, bad_bytes=bad, first_line_alone=alone)
    return NotOneDocument(err.line, err.column, err.msg, first_line_alone=alone)
