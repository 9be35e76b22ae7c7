"""Reading examples from files, named datasets and the Hugging Face hub.

Every source becomes a list of `Example`s: a chat (`messages`), an id and the row's other fields
(`meta`). Files are read with the standard library (parquet through pyarrow, if installed); any
problem with the input becomes one `DualSelectError` naming the file, the line or record, and what
is wrong.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DualSelectError

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion", "alpaca", "hh", "prompt")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
ROW_RANGE = re.compile(r"^(.+)\[(\d*):(\d*)\]$")  # "source[START:END]"
COLUMN_NAMES = ("prompt", "response", "id", "text", "messages", "instruction", "input", "output")
# The longest JSONL line read (characters). A longer one is an error raised after reading this much of it, so a
# file without line breaks (or a runaway record) fails at once instead of being read, parsed and tokenized whole.
MAX_LINE_CHARS = 8 * 2**20
# Roles other tools use, and the role they map to here (only for the hint of an error message).
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
              "chatbot": "assistant"}


@dataclass
class Example:
    id: str
    messages: list[dict[str, str]]
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """Content of the last user message ("" if there is none)."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return ""

    @property
    def response(self) -> str:
        """Content of the final assistant message; "" if the last message is not an assistant one."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return ""


@dataclass
class LoadReport:
    """What was loaded, for the run directory."""

    source: str
    sha256: str  # of the file bytes as stored; "" for the hub
    format: str
    n_read: int
    n_kept: int
    n_skipped_empty: int
    path: str = ""  # the file actually read ("" for the hub)


@dataclass
class Row:
    """One raw record: `where` prefixes error messages, `source` goes into meta["source"]."""

    where: str
    source: str
    data: dict


# --------------------------------------------------------------------------------------------
# Public entry point


def load_examples(source: str, *, data_dir: str | None = None, fmt: str = "auto",
                  columns: dict[str, str] | None = None, limit: int | None = None,
                  require_response: bool = True) -> tuple[list[Example], LoadReport]:
    """Load examples from a file path, a named dataset ("sst2:dev") or "hf:owner/name[:split]"; a source may
    end in a row range "[START:END]" of its kept records (e.g. "sst2:train[1000:1200]", a validation slice
    disjoint from "sst2:train[:1000]"), applied before `limit`.

    fmt: "auto" (detected from the first record's keys) or one of FORMATS.
    columns: canonical name (prompt, response, id, text, messages, instruction, input, output)
        -> the file's column name.
    limit: keep the first `limit` kept records.
    require_response: skip records without a response (training data); False for eval prompts.
    """
    from . import named

    if fmt != "auto" and fmt not in FORMATS:
        raise DualSelectError(f"unknown data format '{fmt}' (formats: auto, {', '.join(FORMATS)})")
    for key in columns or {}:
        if key not in COLUMN_NAMES:
            raise DualSelectError(f"unknown column role '{key}' in columns (roles: {', '.join(COLUMN_NAMES)})")
    if limit is not None and limit < 0:
        raise DualSelectError(f"limit must be >= 0, got {limit}")

    rows_range = ROW_RANGE.match(source)
    if rows_range and not Path(source).expanduser().is_file():
        inner, start, end = rows_range.group(1), int(rows_range.group(2) or 0), rows_range.group(3)
        end = int(end) if end else None
        if end is not None and end <= start:
            raise DualSelectError(f"{source}: the row range [{start}:{end}] is empty")
        examples, report = load_examples(inner, data_dir=data_dir, fmt=fmt, columns=columns, limit=end,
                                         require_response=require_response)
        examples = examples[start:end][:limit]
        if not examples:
            raise DualSelectError(f"{source}: no records in the row range (the source has {report.n_kept})")
        return examples, replace(report, source=source, n_kept=len(examples))
    if source.startswith("hf:"):
        return _load_hub(source, fmt=fmt, columns=columns, limit=limit, require_response=require_response)
    path = Path(source).expanduser()
    if path.is_file():
        rows = read_rows(path)
        return build_examples(rows, source=source, path=path, stem=file_stem(path), fmt=fmt, columns=columns,
                              limit=limit, require_response=require_response)
    if source.split(":", 1)[0] in named.NAMED_DATASETS:
        if fmt != "auto" or columns:
            raise DualSelectError(f"fmt and columns apply to files; named dataset '{source}' defines its own")
        return named.load_named(source, data_dir=data_dir, limit=limit, require_response=require_response)
    if path.is_dir():
        raise DualSelectError(f"{source}: is a directory, not a data file")
    if any(sep in source for sep in ("/", "\\")) or _known_extension(path):
        raise DualSelectError(f"{source}: file not found")
    raise DualSelectError(
        f"'{source}' is neither a file nor a named dataset (named datasets: {', '.join(named.NAMED_DATASETS)}; "
        "hub datasets: hf:owner/name[:split])"
    )


# --------------------------------------------------------------------------------------------
# Files -> rows


def _known_extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((ext for ext in EXTENSIONS if name.endswith(ext)), "")


def file_stem(path: Path) -> str:
    """"x.jsonl.gz" -> "x"."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_rows(path: Path) -> Iterator[Row]:
    """Yield the records of a data file lazily (so `limit` stops reading early)."""
    ext = _known_extension(path)
    if not ext:
        raise DualSelectError(f"{path}: unknown file extension (supported: {', '.join(EXTENSIONS)}, each optionally .gz)")
    if not path.is_file():
        raise DualSelectError(f"{path}: file not found")
    gz = path.name.lower().endswith(".gz")
    reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".tsv": _csv_rows,
              ".parquet": _parquet_rows}[ext]
    return _guard(path, reader(path, gz))


def _guard(path: Path, rows: Iterator[Row]) -> Iterator[Row]:
    """Turn decoding problems raised while reading into one clear error."""
    try:
        yield from rows
    except UnicodeDecodeError as e:
        found = _first_bad_utf8(path)
        at = f" at line {found[0]} (byte {found[1]}: {found[2]})" if found else f" ({e.reason})"
        raise DualSelectError(f"{path}: not UTF-8 text{at}; save the file as UTF-8, e.g. "
                              f"iconv -f latin1 -t utf-8 IN > OUT") from None
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DualSelectError(f"{path}: cannot read the file ({e})") from None


def _first_bad_utf8(path: Path) -> tuple[int, int, str] | None:
    """(line, byte offset in the file's text, reason) of the first bytes that are not UTF-8; None if the file
    reads as UTF-8 (or cannot be read again). The offset counts decompressed bytes for a .gz file."""
    offset = 0
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            for lineno, raw in enumerate(fh, 1):  # split at b"\n", which never occurs inside a UTF-8 character
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return lineno, offset + e.start, e.reason
                offset += len(raw)
    except (OSError, EOFError):
        return None
    return None


def _open_text(path: Path, gz: bool, newline: str | None = None):
    if gz:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _jsonl_rows(path: Path, gz: bool) -> Iterator[Row]:
    with _open_text(path, gz) as fh:
        lineno = 0
        while line := fh.readline(MAX_LINE_CHARS + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                raise DualSelectError(
                    f"{where}: line {lineno} is longer than {MAX_LINE_CHARS:,} characters, the limit for one JSONL "
                    "record (a file without line breaks? JSONL holds one JSON object per line; one JSON array "
                    "belongs in a .json file)")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DualSelectError(f"{where}: invalid JSON ({e.msg} at column {e.colno} of line {lineno}); "
                                      "fix the line or remove it") from None
            if not isinstance(obj, dict):
                raise DualSelectError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield Row(where, f"{path.name}:{lineno}", obj)


def _json_rows(path: Path, gz: bool) -> Iterator[Row]:
    with _open_text(path, gz) as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg.startswith("Extra data") else ""
        raise DualSelectError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                              f"{hint}") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DualSelectError(f"{path}: expected a list of objects, or an object holding one list "
                                  f"(got an object with keys: {', '.join(obj) or 'none'})")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DualSelectError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj, 1):
        where = f"{path}: record {i}"
        if not isinstance(item, dict):
            raise DualSelectError(f"{where}: expected an object, got {type(item).__name__}")
        yield Row(where, f"{path.name}:record {i}", item)


def _csv_rows(path: Path, gz: bool) -> Iterator[Row]:
    tsv = _known_extension(path) == ".tsv"
    # TSV files (e.g. GLUE's) use no quoting: a '"' is text. CSV follows RFC 4180 quoting.
    opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    with _open_text(path, gz, newline="") as fh:
        reader = csv.reader(fh, **opts)
        try:
            header = next(reader, None)
            if header is None:
                return
            end = reader.line_num
            for i, values in enumerate(reader, 1):
                start, end = end + 1, reader.line_num
                if not values:  # blank line
                    continue
                where = f"{path}: record {i} (line {start})"
                if len(values) != len(header):
                    raise DualSelectError(f"{where}: {len(values)} fields, but the header has {len(header)} "
                                          f"({', '.join(header)})")
                yield Row(where, f"{path.name}:{start}", dict(zip(header, values)))
        except csv.Error as e:
            raise DualSelectError(f"{path}:{reader.line_num}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None


def _parquet_rows(path: Path, gz: bool) -> Iterator[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DualSelectError(f"{path}: reading parquet needs pyarrow: pip install 'dualselect[parquet]'") from None
    try:
        src = pa.BufferReader(gzip.decompress(path.read_bytes())) if gz else str(path)
        table = pq.read_table(src)
    except (pa.ArrowException, OSError, EOFError) as e:
        raise DualSelectError(f"{path}: cannot read parquet ({e})") from None
    for i, item in enumerate(table.to_pylist(), 1):
        yield Row(f"{path}: record {i}", f"{path.name}:record {i}", item)


# --------------------------------------------------------------------------------------------
# Rows -> examples


def _text(row: Row, key: str, value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise DualSelectError(f"{row.where}: '{key}' must be text for {fmt} format, got {type(value).__name__}")


def detect_format(keys: Iterable[str], columns: dict[str, str]) -> str | None:
    """The format a record with these keys is in (after the `columns` mapping), or None."""
    keys = set(keys)

    def has(name: str) -> bool:
        return columns.get(name, name) in keys

    if has("messages"):
        return "messages"
    if "text" in columns or "chosen" in keys:
        return "hh"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt") and ("response" in columns or keys & {"completion", "response"}):
        return "prompt_completion"
    if has("prompt"):
        return "prompt"
    return None


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(text: str) -> list[dict[str, str]]:
    """HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages.

    Consecutive turns of the same speaker (a few transcripts have them) are joined with a blank
    line, so roles alternate. Raises ValueError if the text does not start with a Human turn.
    """
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise ValueError("does not look like an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def alpaca_prompt(instruction: str, input_: str) -> str:
    """instruction, then "\\n" + input when input is non-empty and different from instruction."""
    if input_ and input_ != instruction:
        return instruction + "\n" + input_
    return instruction


def _messages_value(row: Row, key: str, value) -> list[dict[str, str]]:
    def bad(detail: str) -> DualSelectError:
        return DualSelectError(f"{row.where}: '{key}' must be a list of {{role, content}} "
                               f"(role one of {', '.join(ROLES)}, content text); {detail}")

    if isinstance(value, str):  # e.g. a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad("got text that is not JSON") from None
    if not isinstance(value, list):
        raise bad(f"got {type(value).__name__}")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise bad(f"message {i} is {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLES:
            alias = ROLE_HINTS.get(str(role).strip().lower())
            hint = f" (rename it to '{alias}')" if alias else ""
            raise bad(f"message {i} has role {role!r}{hint}" if "role" in m else f"message {i} has no 'role'")
        if not isinstance(m.get("content"), str):
            raise bad(f"message {i} has no 'content'" if "content" not in m else
                      f"the content of message {i} is {type(m['content']).__name__}, not text")
        out.append({"role": role, "content": m["content"]})
    return out


def _column(row: Row, name: str, col: str, fmt: str, required: bool = True):
    if col not in row.data:
        if not required:
            return None
        raise DualSelectError(f"{row.where}: no '{col}' column for {fmt} format (columns: {', '.join(map(str, row.data))})")
    return row.data[col]


def row_messages(row: Row, fmt: str, columns: dict[str, str]) -> tuple[list[dict[str, str]], set[str]]:
    """The messages of one row in `fmt`, and the columns they used (the others go to meta)."""
    col = lambda name: columns.get(name, name)  # noqa: E731

    def turn(prompt: str, response: str) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": prompt}]
        if response:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    if fmt == "messages":
        c = col("messages")
        return _messages_value(row, c, _column(row, c, c, fmt)), {c}
    if fmt == "hh":
        c = col("text") if "text" in columns else "chosen"
        text = _text(row, c, _column(row, c, c, fmt), fmt)
        try:
            return parse_hh(text), {c}
        except ValueError as e:
            raise DualSelectError(f"{row.where}: '{c}' {e}") from None
    if fmt == "alpaca":
        ci, cn, co = col("instruction"), col("input"), col("output")
        instruction = _text(row, ci, _column(row, ci, ci, fmt), fmt)
        input_ = _text(row, cn, _column(row, cn, cn, fmt, required=False), fmt)
        output = _text(row, co, _column(row, co, co, fmt), fmt)
        return turn(alpaca_prompt(instruction, input_), output), {ci, cn, co}
    cp = col("prompt")
    prompt = _text(row, cp, _column(row, cp, cp, fmt), fmt)
    if fmt == "prompt":
        return turn(prompt, ""), {cp}
    # prompt_completion
    cr = columns.get("response") or ("completion" if "completion" in row.data else "response")
    response = _text(row, cr, _column(row, cr, cr, fmt), fmt)
    return turn(prompt, response), {cp, cr}


def build_examples(rows: Iterable[Row], *, source: str, path: Path | None, stem: str, fmt: str = "auto",
                   columns: dict[str, str] | None = None, limit: int | None = None,
                   require_response: bool = True,
                   transform: Callable[[Row], dict | None] | None = None) -> tuple[list[Example], LoadReport]:
    """Turn raw rows into examples (shared by files, named datasets and the hub).

    `transform` (named datasets) rewrites a row's data before conversion, or returns None to leave
    the row out (a filter, not counted as read).
    """
    columns = dict(columns or {})
    if fmt == "prompt" and require_response:
        raise DualSelectError(f"{source}: format 'prompt' has no responses; "
                              "pass require_response=False to load prompts (eval sets)")
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    n_rows = n_read = n_skipped = 0
    id_col = columns.get("id", "id")
    for index, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        n_rows += 1
        if transform is not None:
            data = transform(row)
            if data is None:
                continue
            row = Row(row.where, row.source, data)
        n_read += 1
        if fmt == "auto":
            fmt = detect_format(row.data, columns) or ""
            if not fmt:
                raise DualSelectError(
                    f"{row.where}: cannot detect the data format from the columns "
                    f"({', '.join(map(str, row.data)) or 'none'}); formats: "
                    "messages (messages), prompt_completion (prompt + completion|response), "
                    "alpaca (instruction, input, output), hh (chosen), prompt (prompt); "
                    "set data.format and/or data.columns={canonical: column}, e.g. "
                    "data.columns={prompt: question, response: answer} (Python: fmt=..., columns=...)")
            if fmt == "prompt" and require_response:
                raise DualSelectError(f"{row.where}: records have a prompt but no response column "
                                      f"(columns: {', '.join(map(str, row.data))}); map one with "
                                      "data.columns={response: COLUMN}; prompt-only files are eval sets "
                                      "(eval.benchmarks; Python: require_response=False)")
        messages, used = row_messages(row, fmt, columns)
        raw_id = row.data.get(id_col)
        ex_id = str(raw_id) if raw_id not in (None, "") else f"{stem}-{index}"
        if ex_id in first_seen:
            raise DualSelectError(f"{row.where}: duplicate id '{ex_id}' (first at {first_seen[ex_id]}); "
                                  "give every record its own id")
        first_seen[ex_id] = row.where
        meta = {k: v for k, v in row.data.items() if k not in used and k != id_col}
        meta["source"] = row.source
        ex = Example(ex_id, messages, meta)
        if not ex.prompt.strip() or (require_response and not ex.response.strip()):
            n_skipped += 1
            continue
        examples.append(ex)
    if n_rows == 0 and limit != 0:
        raise DualSelectError(f"{path or source}: no records (the {'file' if path else 'dataset'} is empty); "
                              "check that this is the data you meant to load")
    if n_read and n_skipped == n_read:
        what = "prompt or response" if require_response else "prompt"
        raise DualSelectError(f"{path or source}: all {n_read} records have an empty {what}, so none is usable; "
                              f"fill in the {what} texts (or map the right columns with data.columns)")
    report = LoadReport(source=source, sha256=sha256_file(path) if path else "", format=fmt if fmt != "auto" else "",
                        n_read=n_read, n_kept=len(examples), n_skipped_empty=n_skipped,
                        path=str(path) if path else "")
    return examples, report


# --------------------------------------------------------------------------------------------
# Hugging Face hub


def _load_hub(source: str, *, fmt: str, columns: dict[str, str] | None, limit: int | None,
              require_response: bool) -> tuple[list[Example], LoadReport]:
    name, _, split = source[3:].partition(":")
    split = split or "train"
    if not name:
        raise DualSelectError(f"'{source}': expected hf:owner/name[:split]")
    try:
        import datasets
    except ImportError:
        raise DualSelectError(f"reading '{source}' needs the datasets package: pip install 'dualselect[hub]'") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset or split: all reported the same way
        raise DualSelectError(f"cannot load '{name}' (split '{split}') from the Hugging Face hub: "
                              f"{type(e).__name__}: {e}") from None
    rows = (Row(f"{source}: record {i}", f"{source}:record {i}", dict(item)) for i, item in enumerate(ds, 1))
    return build_examples(rows, source=source, path=None, stem=name.split("/")[-1], fmt=fmt, columns=columns,
                          limit=limit, require_response=require_response)

