"""``training.inputs.json_document``: a JSON file read element by element accepts and refuses
exactly what ``json.loads`` on the whole file does, at the same line and column, and reads no
further ahead than the element it gives out."""

from __future__ import annotations

import io
import json
import random

import pytest

from training.inputs.json_document import NotOneDocument, iter_document_rows

# Chunk sizes that cut tokens, escapes and multi-byte characters anywhere, and one whole read.
CHUNKS = (1, 2, 3, 7, 64, 1 << 20)


def whole_file(raw: bytes):
    """What ``json.loads`` on the whole file gives: its rows, or where and why it fails, and
    whether the first non-blank line is JSON by itself."""
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        body = raw.removeprefix(b"\xef\xbb\xbf")
        line = body[: e.start].count(b"\n") + 1
        return ("utf8", line, body[e.start : e.end], first_line_alone(raw))
    except json.JSONDecodeError as e:
        return ("json", e.lineno, e.colno, e.msg, first_line_alone(raw))
    return ("rows", data if isinstance(data, list) else [data])


def first_line_alone(raw: bytes) -> bool:
    first = next((line for line in raw.splitlines() if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8-sig"))
    except ValueError:
        return False
    return True


def streamed(raw: bytes, chunk: int):
    try:
        rows = list(iter_document_rows(io.BytesIO(raw), lambda v: [v], chunk_bytes=chunk))
    except NotOneDocument as e:
        if e.bad_bytes is not None:
            return ("utf8", e.line, e.bad_bytes, e.first_line_alone)
        return ("json", e.line, e.column, e.msg, e.first_line_alone)
    return ("rows", rows)


def documents(seed: int, count: int) -> list[bytes]:
    """JSON files, well-formed and with bytes inserted, deleted or cut off at random."""
    rng = random.Random(seed)
    rows = [
        {"prompt": f"p\u00fc{i}", "chosen": "a" * i, "rejected": [1, -2.5e3, None, True]}
        for i in range(5)
    ]
    base = [
        json.dumps(rows).encode(),
        json.dumps(rows, indent=1).encode(),
        b"\xef\xbb\xbf" + json.dumps(rows).encode(),
        b"".join(json.dumps(r).encode() + b"\n" for r in rows),  # JSON lines
        json.dumps(rows[:2]).encode() + b"\n" + json.dumps(rows[0]).encode(),
        json.dumps({"chosen": ["a", "b"], "rejected": ["c", "d"]}).encode(),
        b"[-Infinity, 12345, 1e5, 2.5E-3]"  # NaN != NaN: not compared,
        b"123\n456",
        b"  \n ",
    ]
    pieces = [b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"\n", b"\r", b" ", b"1", b"-",
              b"e", b".", b"t", b"\xff", b"\xc3", b"\x00"]  # fmt: skip
    out = list(base)
    while len(out) < count:
        raw = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            at, op = rng.randint(0, len(raw)), rng.random()
            if op < 0.4 and raw:
                del raw[min(at, len(raw) - 1)]
            elif op < 0.8:
                raw[at:at] = rng.choice(pieces)
            else:
                del raw[at:]
        out.append(bytes(raw))
    return out


def test_every_file_reads_as_json_loads_reads_it_whole():
    files = documents(seed=0, count=400)
    outcomes = {whole_file(raw)[0] for raw in files}
    assert outcomes == {"rows", "json", "utf8"}  # the mutations reach every outcome
    for raw in files:
        want = whole_file(raw)
        for chunk in CHUNKS:
            assert streamed(raw, chunk) == want, (raw, chunk)


class CountingReader(io.BytesIO):
    """A binary file that records how many bytes were read, and the largest read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.total = self.largest = 0

    def read(self, size=-1):
        data = super().read(size)
        self.total += len(data)
        self.largest = max(self.largest, len(data))
        return data


def test_rows_come_one_at_a_time_reading_only_a_chunk_ahead():
    rows = [{"prompt": f"q{i}", "chosen": " yes" * 20, "rejected": " no"} for i in range(3000)]
    texts = [json.dumps(r) for r in rows]
    data = ("[" + ", ".join(texts) + "]").encode()
    chunk = 4096
    f = CountingReader(data)
    reader = iter_document_rows(f, lambda v: [v], chunk_bytes=chunk)
    ends = []  # where each row's text ends in the file
    for text in texts:
        ends.append((ends[-1] + 2 if ends else 1) + len(text))
    for i, end in enumerate(ends):
        assert next(reader) == rows[i]
        # never more than a chunk (and what is held, under a chunk) past the row given out
        assert end <= f.total <= end + 2 * chunk, i
    assert list(reader) == []
    assert f.total == len(data) and f.largest <= 2 * chunk


def test_a_row_longer_than_a_chunk_is_read_whole():
    rows = [{"chosen": "x" * 50_000, "rejected": "y"}, {"chosen": "a", "rejected": "b"}]
    f = CountingReader(json.dumps(rows).encode())
    assert list(iter_document_rows(f, lambda v: [v], chunk_bytes=1000)) == rows


def test_an_object_is_handed_to_rows_of_after_the_whole_file_parses():
    seen = []
    reader = iter_document_rows(io.BytesIO(b'{"a": 1} x'), seen.append)
    with pytest.raises(NotOneDocument) as err:
        list(reader)
    assert (err.value.msg, err.value.line, err.value.column) == ("Extra data", 1, 10)
    assert seen == []  # not handed over: the file is not one document
    assert list(iter_document_rows(io.BytesIO(b' {"a": 1}\n'), lambda v: [v, v])) == [{"a": 1}] * 2
