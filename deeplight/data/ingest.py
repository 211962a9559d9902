"""Raw Criteo/Avazu files (plain, .gz, local or s3://) to typed Parquet splits; bad rows quarantined by line.

`ingest` streams each input in blocks of bytes (memory stays bounded whatever the file size), checks every line,
writes the good rows to `OUT/{train,valid,test}/part-NNNNN.parquet` and every bad row, with its file, 1-based
line number (the header line counts) and reason, to `OUT/quarantine.jsonl`. `read = written + quarantined`
always holds per input and overall. Everything is written in a temporary sibling directory that replaces `OUT`
only when the run succeeds.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> raw = os.path.join(d, "raw.txt")
    >>> row = "\\t".join(["1", "-3"] + [""] * 12 + ["68fd1e64"] * 26)
    >>> _ = open(raw, "w").write(row + "\\n" + row.replace("-3", "x", 1) + "\\n")
    >>> rep = ingest("criteo", [raw], os.path.join(d, "out"), split=(1.0, 0.0, 0.0))
    >>> rep["read"], rep["written"], rep["quarantined"], rep["inputs"][0]["reasons"]
    (2, 1, 1, {'non_integer': 1})
    >>> import json; q = json.loads(open(os.path.join(d, "out", "quarantine.jsonl")).readline())
    >>> q["line"], q["field"], q["kind"], q["reason"]
    (2, 'I1', 'non_integer', "non-integer in integer field 'I1': 'x'")
    >>> import shutil; shutil.rmtree(d)

Quarantine lines are {"file", "line", "reason", "field" (null for a whole-line problem), "kind", "text"}; kinds:
wrong_column_count (a blank line too), non_integer, int_overflow, bad_label, bad_time, undecodable, stray_cr
(a lone carriage return, which would split the line). A UTF-8 byte-order mark at the start of a file is skipped.

Rows are validated by `deeplight.data.validate` (the same code checks served rows).

Speed: a block whose every line is clean (nearly all of a real file) is parsed, checked and split in one
compiled pass (`deeplight.data.parser`); any other block takes the exact path below (pyarrow's CSV reader and
vectorised checks), which finds and explains its bad rows. Two blocks are parsed at once and a third thread
writes Parquet; results are consumed in file order, so the output does not depend on the threads.

Split modes: `random` assigns each data row from a counter-based hash of (seed, global row index), so the result
does not depend on block size; `sequential` cuts by position (first 80% train, ..., last rows test) and so needs
the row count first: a cheap newline-counting pass, which means s3:// and .gz inputs are read twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from deeplight.base.arrow import from_numpy
from deeplight.base.errors import DeeplightError
from deeplight.data.parser import count_lines, parse_clean_block
from deeplight.base.files import atomic_output_dir, open_input, resolve, write_json
from deeplight.base.progress import progress
from deeplight.data.schema import DatasetSchema, get_schema
from deeplight.data.validate import MAX_TEXT, _Bad, _show, _validate, arrow_schema

SPLITS = ("train", "valid", "test")
BLOCK_BYTES = 16 << 20  # raw bytes parsed at once: ~70k Criteo rows
PART_ROWS = 1_000_000  # rows per Parquet part file
ROW_GROUP_ROWS = 131_072  # rows buffered per split before a row group is written
# No compression: the columns are dictionary-encoded and bit-packed already, so snappy saved only 8% of the size
# on 2M synthetic Criteo rows (17% on the real 10k-row sample, whose dictionaries weigh more) for ~8% more CPU to
# write and 12% more to read back; ingest + hash of 2M rows: 6.23 -> 5.96 s. (zstd: 22% smaller, slower still.)
COMPRESSION = "none"
PARSE_THREADS = min(2, os.cpu_count() or 1)  # blocks parsed at once (the compiled parser releases the GIL)
PARSE_AHEAD = 2  # blocks parsed ahead of the one being consumed: bounds memory

_BOM = b"\xef\xbb\xbf"


# --- splits -------------------------------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = x.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def random_splits(seed: int, rows: np.ndarray, split: tuple[float, float, float]) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of each global data-row index: a pure function of (seed, row).

    >>> a = random_splits(7, np.arange(10_000), (0.8, 0.1, 0.1))
    >>> bool((random_splits(7, np.arange(5_000, 6_000), (0.8, 0.1, 0.1)) == a[5_000:6_000]).all())
    True
    >>> (np.bincount(a) / len(a)).round(1).tolist()
    [0.8, 0.1, 0.1]
    """
    key = _splitmix64(np.array([seed & (2 ** 64 - 1)], dtype=np.uint64))[0]
    u = (_splitmix64(key + (rows.astype(np.uint64) + np.uint64(1)) * _GAMMA) >> np.uint64(11)) * 2.0 ** -53
    cuts = np.cumsum(split)[:2]
    return np.searchsorted(cuts, u, side="right").astype(np.int8)


def sequential_splits(total: int, rows: np.ndarray, split: tuple[float, float, float]) -> np.ndarray:
    """Split index by position among `total` data rows: the first split[0] share is train, the last test.

    Boundaries round half up: 33 rows at (0.5, 0.25, 0.25) give 17 train, 8 valid, 8 test.

    >>> np.bincount(sequential_splits(33, np.arange(33), (0.5, 0.25, 0.25))).tolist()
    [17, 8, 8]
    """
    b1, b2 = int(total * split[0] + 0.5), int(total * (split[0] + split[1]) + 0.5)
    return ((rows >= b1).astype(np.int8) + (rows >= b2)).astype(np.int8)


# --- reading ------------------------------------------------------------------------------------------------

def _blocks(stream: pa.NativeFile, uri: str, block_size: int, progress: Callable[[int], object]
            ) -> Iterator[bytearray]:
    """Blocks of whole lines (each ends with a newline, except perhaps the file's last); a long line is carried.

    Each block is a fresh bytearray filled by one read straight from the stream: the only other copy is of the
    partial line carried into the next block.
    """
    carry = b""
    while True:
        buf = bytearray(len(carry) + block_size)
        buf[:len(carry)] = carry
        try:
            got = stream.readinto(memoryview(buf)[len(carry):])
        except OSError as e:
            raise DeeplightError(f"{uri}: cannot read ({e})") from None
        if not got:
            break
        progress(got)
        end = len(carry) + got
        cut = buf.rfind(b"\n", 0, end) + 1
        carry = bytes(buf[cut:end]) if cut else bytes(buf[:end])
        if cut:
            del buf[cut:]
            yield buf
    if carry:
        yield bytearray(carry)


def _count_rows(uri: str, header: bool, block_size: int) -> int:
    """Data rows of one input by counting lines (a final line without newline counts; the header does not)."""
    lines, last = 0, b"\n"
    with open_input(uri) as stream:
        for block in _blocks(stream, uri, block_size, lambda n: None):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return max(lines - header, 0)


def _input_size(uri: str) -> int | None:
    if uri.endswith(".gz"):
        return None
    try:
        fs, path = resolve(uri)
        return fs.get_file_info(path).size
    except (OSError, DeeplightError):
        return None


# --- one block ----------------------------------------------------------------------------------------------

@dataclass
class _BlockResult:
    lines: int  # data lines in the block
    tables: list[pa.Table | None]  # good rows per split (None when none)
    bad: _Bad  # rows = block line indices
    texts: list[str]
    whole_line_problems: bool  # some line had a wrong column count, stray \r or bad UTF-8


def _read_strings(schema: DatasetSchema, data: bytes | memoryview | np.ndarray, max_line: int) -> pa.Table:
    names = schema.names
    return pcsv.read_csv(
        pa.py_buffer(data),
        read_options=pcsv.ReadOptions(column_names=names, block_size=max(4 << 20, 2 * max_line + 2)),
        parse_options=pcsv.ParseOptions(delimiter=schema.delimiter, quote_char=False, escape_char=False,
                                        newlines_in_values=False, ignore_empty_lines=False),
        # UTF-8 is checked by the line scan (only lines with bytes >= 0x80 need it).
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                            strings_can_be_null=False, check_utf8=False),
    )


def _decodes(data: bytes | bytearray) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _process_block(schema: DatasetSchema, data: bytes | bytearray, row_base: int,
                   splitter: Callable[[np.ndarray], np.ndarray], try_fast: bool = True, compiled: bool = True
                   ) -> _BlockResult:
    """Check, parse, validate and split one block of whole lines. Line i of the block is data row row_base + i.

    compiled: first try `fastparse.parse_clean_block`, which takes a block only if every line is clean.
    try_fast: then parse the whole block with pyarrow's CSV reader and let it prove every column count right; a
    block with whole-line problems takes the exact path (count delimiters per line, parse only the good lines).
    """
    if compiled:  # clean blocks (nearly all) in one compiled pass; any doubt falls through to the checks below
        tables = parse_clean_block(schema, data, lambda n: splitter(row_base + np.arange(n)))
        if tables is not None:
            return _BlockResult(sum(t.num_rows for t in tables if t is not None), tables, _Bad(), [], False)
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    ends = nl if buf[-1] == 10 else np.append(nl, len(buf))  # a last line may lack its newline
    n = len(ends)
    starts = np.empty(n, np.int64)
    starts[0], starts[1:] = 0, nl[:n - 1] + 1
    cr_end = (ends > starts) & (buf[ends - 1] == 13)  # \r\n line ends
    cend = ends - cr_end
    ncols = len(schema.columns)

    # Whole-line problems. Cheap checks first: a stray \r would split a line in the CSV parser, bytes >= 0x80
    # need a UTF-8 check, and a blank line parses as a row of empty values.
    struct = _Bad()
    crs = np.flatnonzero(buf == 13) if data.find(b"\r") >= 0 else np.empty(0, np.int64)
    if len(crs):
        nxt = np.minimum(crs + 1, len(buf) - 1)
        stray = crs[(crs + 1 < len(buf)) & (buf[nxt] != 10)]
        for i in np.unique(np.searchsorted(ends, stray)).tolist():
            struct.add(i, None, "stray_cr", "carriage return inside the line")
    if not data.isascii() and not _decodes(data):
        high = np.flatnonzero(buf >= 0x80)
        seen = set(struct.rows)  # a line is reported once, for its first problem
        for i in np.unique(np.searchsorted(ends, high)).tolist():
            if i in seen:
                continue
            try:
                bytes(data[starts[i]:cend[i]]).decode("utf-8")
            except UnicodeDecodeError as e:
                struct.add(i, None, "undecodable", f"undecodable bytes (not UTF-8) at byte {e.start + 1} of the line")
    blank = bool(np.any(cend == starts))
    max_line = int((cend - starts).max())

    table = None
    if try_fast and not struct.rows and not blank:
        try:  # fast path: the parser checks every line's column count itself
            table = _read_strings(schema, data, max_line)
        except pa.ArrowInvalid:
            table = None
        if table is not None and table.num_rows != n:
            table = None
    if table is not None:
        good_lines = np.arange(n)
    else:
        # Exact path: delimiters per line = delimiters before its end minus those before the previous end.
        delims = np.flatnonzero(buf == ord(schema.delimiter))
        fields = np.diff(np.searchsorted(delims, ends), prepend=0) + 1
        marked = np.zeros(n, bool)
        marked[struct.rows] = True
        for i in np.flatnonzero((fields != ncols) & ~marked).tolist():
            struct.add(i, None, "wrong_column_count", f"wrong column count: expected {ncols}, got {fields[i]}")
        marked[struct.rows] = True
        good_lines = np.flatnonzero(~marked)
        full_ends = np.append(nl + 1, len(buf))[:n]
        keep = np.repeat(~marked, full_ends - starts)
        good_bytes = buf[keep]
        if len(good_lines):
            table = _read_strings(schema, good_bytes, max_line)
            if table.num_rows != len(good_lines):
                raise RuntimeError(f"parser saw {table.num_rows} rows in {len(good_lines)} checked lines")
        else:
            table = pa.table({name: pa.nulls(0, pa.string()) for name in schema.names})

    typed, vbad = _validate(schema, table, drop_bad=False)  # one filter per split below drops the bad rows
    split_of = splitter(row_base + good_lines)
    if vbad.rows:
        split_of[vbad.rows] = -1
        vbad.rows = good_lines[vbad.rows].tolist()

    bad = (struct + vbad).sorted()
    texts = [bytes(data[starts[i]:cend[i]]).decode("utf-8", errors="replace")[:MAX_TEXT] for i in bad.rows]

    tables: list[pa.Table | None] = [None, None, None]
    present = np.unique(split_of)
    if len(present) == 1 and present[0] >= 0:
        tables[int(present[0])] = typed
    else:
        for s in present[present >= 0].tolist():
            tables[s] = typed.filter(from_numpy(split_of == s))
    return _BlockResult(n, tables, bad, texts, bool(struct.rows))


# --- writing ------------------------------------------------------------------------------------------------

class _SplitWriter:
    """Parquet part files of one split: row groups of ~ROW_GROUP_ROWS rows, a new file every `part_rows`."""

    def __init__(self, directory: Path, schema: pa.Schema, part_rows: int, row_group_rows: int) -> None:
        self.dir, self.schema = directory, schema
        self.part_rows, self.row_group_rows = part_rows, row_group_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0
        self.rows = 0
        self.rows_in_part = 0
        self.writer: pq.ParquetWriter | None = None
        # Statistics only on the numeric columns: min/max of hex strings cost time and serve no query.
        self.stats = [f.name for f in schema if not pa.types.is_string(f.type)]
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending, self.pending_rows = [], 0
        while table.num_rows:
            if self.writer is None:
                path = self.dir / f"part-{self.parts:05d}.parquet"
                self.writer = pq.ParquetWriter(path, self.schema, compression=COMPRESSION,
                                               write_statistics=self.stats)
                self.parts += 1
                self.rows_in_part = 0
            piece = table.slice(0, self.part_rows - self.rows_in_part)
            self.writer.write_table(piece)
            self.rows_in_part += piece.num_rows
            self.rows += piece.num_rows
            table = table.slice(piece.num_rows)
            if self.rows_in_part >= self.part_rows:
                self.writer.close()
                self.writer = None

    def close(self) -> None:
        if self.pending:
            self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- the run ------------------------------------------------------------------------------------------------

@dataclass
class _InputStats:
    file: str
    read: int = 0
    written: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_bad: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"file": self.file, "read": self.read, "written": self.written, "quarantined": self.quarantined,
                "reasons": dict(sorted(self.reasons.items()))}


def _check_args(inputs: list[str], split: tuple[float, ...], split_mode: str, max_bad_fraction: float
                ) -> tuple[float, float, float]:
    if isinstance(inputs, (str, os.PathLike)) or not inputs:
        raise DeeplightError("ingest: give a non-empty list of input files")
    try:
        fractions = tuple(float(x) for x in split)
    except (TypeError, ValueError):
        raise DeeplightError(f"split: want three fractions, got {split!r}") from None
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DeeplightError(f"split: want three non-negative fractions summing to 1, got {split!r}")
    if split_mode not in ("random", "sequential"):
        raise DeeplightError(f"split_mode: want random or sequential, got {split_mode!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise DeeplightError(f"max_bad_fraction: want a number in [0, 1], got {max_bad_fraction!r}")
    return fractions  # type: ignore[return-value]


def _check_header(schema: DatasetSchema, uri: str, line: bytes) -> None:
    expected = schema.delimiter.join(schema.names)
    got = line.rstrip(b"\r").decode("utf-8", errors="replace")
    if got == expected:
        return
    names, ncols = got.split(schema.delimiter), len(schema.names)
    diff = next((i for i, (a, b) in enumerate(zip(names, schema.names)) if a != b), None)
    detail = (f"column {diff + 1} is {_show(names[diff])}, expected {schema.names[diff]!r}" if diff is not None
              else f"{len(names)} columns, expected {ncols}")
    raise DeeplightError(f"{uri}: line 1 is not the {schema.name} header ({detail}); want {expected!r}")


def ingest(dataset: str, inputs: list[str], out_dir: str, split: tuple[float, float, float] = (0.8, 0.1, 0.1),
           split_mode: str = "random", seed: int = 0, max_bad_fraction: float = 0.5) -> dict:
    """Raw files -> typed Parquet splits in `out_dir` (atomically); returns the report (also report.json).
    An input ending in "/" (s3://bucket/day/ or a local folder) stands for the files under it (`expand_inputs`)."""
    return _ingest(dataset, expand_inputs(inputs), out_dir, split, split_mode, seed, max_bad_fraction)


# --- per-file ingest (the fan-out pipeline: one KFP task per input file) -------------------------------------

def expand_inputs(inputs: list[str]) -> list[str]:
    """Inputs with every prefix ("s3://bucket/day/" or a local folder ending in "/") replaced by the files under it,
    sorted by name (hidden files and folders skipped); other inputs kept as given, in order.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp(); _ = [open(os.path.join(d, n), "w").close() for n in ("b.txt", "a.txt", ".x")]
    >>> [os.path.basename(u) for u in expand_inputs([d + "/"])]
    ['a.txt', 'b.txt']
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise DeeplightError("ingest: give a list of input files")
    out: list[str] = []
    for uri in map(str, inputs):
        if not uri.endswith("/"):
            out.append(uri)
            continue
        fs, path = resolve(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True))
        except (OSError, FileNotFoundError) as e:
            raise DeeplightError(f"{uri}: cannot list ({e})") from None
        scheme = "s3://" if uri.startswith("s3://") else ""
        found = sorted(scheme + i.path for i in infos if i.type == pafs.FileType.File
                       and not any(part.startswith(".") for part in i.path[len(path.rstrip("/")):].split("/")))
        if not found:
            raise DeeplightError(f"{uri}: no files under this prefix")
        out.extend(found)
    return out


def plan_files(dataset: str, inputs: list[str], block_size: int = BLOCK_BYTES) -> list[dict]:
    """One work item per input file for a per-file ingest: {"index", "uri", "rows", "first_row", "rows_total"}.

    Counts every file's data rows (a newline-counting pass, files in parallel threads) so that each file knows the
    global index of its first row: the split of a row is then decided exactly as by one `ingest` of all inputs
    (random: a hash of (seed, global row index); sequential: position among all rows), whichever worker reads it.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp(); row = "\\t".join(["1"] * 14 + ["68fd1e64"] * 26) + "\\n"
    >>> for name, n in (("a.txt", 3), ("b.txt", 2)): _ = open(os.path.join(d, name), "w").write(row * n)
    >>> [(f["index"], f["rows"], f["first_row"], f["rows_total"]) for f in plan_files("criteo", [d + "/"])]
    [(0, 3, 0, 5), (1, 2, 3, 5)]
    """
    schema = get_schema(dataset)
    uris = expand_inputs(inputs)
    for uri in uris:
        open_input(uri).close()
    with ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="deeplight-count") as pool:
        counts = list(pool.map(lambda u: _count_rows(u, schema.header, block_size), uris))
    items, first = [], 0
    for i, (uri, rows) in enumerate(zip(uris, counts)):
        if rows == 0:
            raise DeeplightError(f"{uri}: no data rows")
        items.append({"index": i, "uri": uri, "rows": rows, "first_row": first})
        first += rows
    return [{**item, "rows_total": first} for item in items]


def ingest_file(dataset: str, item: dict, out_dir: str, split: tuple[float, float, float] = (0.8, 0.1, 0.1),
                split_mode: str = "random", seed: int = 0, max_bad_fraction: float = 0.5, **sizes: int) -> dict:
    """Ingest the one input of a `plan_files` item into `out_dir`, its rows numbered from item["first_row"] among
    item["rows_total"]: the rows of each split, their order and the quarantine lines (file and line) are exactly
    that file's share of one `ingest` of all inputs. The report carries the item ("part")."""
    try:
        index, uri, rows = int(item["index"]), str(item["uri"]), int(item["rows"])  # KFP passes numbers as floats
        first_row, rows_total = int(item["first_row"]), int(item["rows_total"])
    except (KeyError, TypeError, ValueError) as e:
        raise DeeplightError(f"ingest: not a plan_files item ({e}): {item!r}") from None
    report = _ingest(dataset, [uri], out_dir, split, split_mode, seed, max_bad_fraction, first_row=first_row,
                     rows_total=rows_total, **sizes)
    if report["read"] != rows:  # the next files' row numbers were computed from this count
        raise DeeplightError(f"{uri}: changed since it was counted ({rows} rows counted, then {report['read']} read)")
    report["part"] = {"index": index, "uri": uri, "rows": rows, "first_row": first_row, "rows_total": rows_total}
    write_json(Path(out_dir) / "report.json", report)
    return report


def merge_reports(reports: list[dict]) -> dict:
    """The report one `ingest` of all inputs would have written, from the per-file reports (any order)."""
    if not reports:
        raise DeeplightError("ingest: no per-file reports to merge")
    reports = sorted(reports, key=lambda r: r["part"]["index"])
    first = reports[0]
    merged = {"dataset": first["dataset"], "inputs": [r["inputs"][0] for r in reports],
              **{k: sum(r[k] for r in reports) for k in ("read", "written", "quarantined")},
              "splits": {s: sum(r["splits"][s] for r in reports) for s in SPLITS},
              "split": first["split"], "split_mode": first["split_mode"], "seed": first["seed"]}
    return merged


def _ingest(dataset: str, inputs: list[str], out_dir: str, split: tuple[float, float, float] = (0.8, 0.1, 0.1),
            split_mode: str = "random", seed: int = 0, max_bad_fraction: float = 0.5, *,
            block_size: int = BLOCK_BYTES, part_rows: int = PART_ROWS, row_group_rows: int = ROW_GROUP_ROWS,
            first_row: int = 0, rows_total: int | None = None) -> dict:
    """`ingest` with the block size, part size and row-group size exposed (tests use tiny ones). first_row: the
    global index of the first input's first data row; rows_total: all rows of a sequential split (both from
    `plan_files`, for one file of many)."""
    schema = get_schema(dataset)
    fractions = _check_args(inputs, split, split_mode, max_bad_fraction)
    inputs = [str(u) for u in inputs]
    for uri in inputs:  # fail fast on a missing input, before reading anything
        open_input(uri).close()
    counts: list[int | None] = [None] * len(inputs)
    if split_mode == "sequential" and rows_total is not None:  # counted by plan_files (ingest_file checks it)
        total = rows_total
        splitter: Callable[[np.ndarray], np.ndarray] = lambda rows: sequential_splits(total, rows, fractions)
    elif split_mode == "sequential":
        counts = [_count_rows(uri, schema.header, block_size) for uri in inputs]
        for uri, count in zip(inputs, counts):
            if count == 0:
                raise DeeplightError(f"{uri}: no data rows")
        total = sum(counts)  # type: ignore[arg-type]
        splitter = lambda rows: sequential_splits(total, rows, fractions)
    else:
        splitter = lambda rows: random_splits(seed, rows, fractions)

    sizes = [_input_size(uri) for uri in inputs]
    stats = [_InputStats(uri) for uri in inputs]
    with atomic_output_dir(out_dir, step="ingest", inputs=inputs, legacy_files=("report.json",)) as tmp, \
            progress(total=None if None in sizes else sum(sizes), unit="B", desc="ingest") as bar, \
            open(tmp / "quarantine.jsonl", "w") as quarantine, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="deeplight-write") as pool, \
            ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="deeplight-parse") as parse_pool:
        writers = [_SplitWriter(tmp / name, arrow_schema(schema), part_rows, row_group_rows) for name in SPLITS]
        pending: list[Future] = []  # Parquet writing overlaps the parsing of the next block; at most 2 queued

        def submit(tables: list[pa.Table | None]) -> None:
            while len(pending) >= 2:
                pending.pop(0).result()
            pending.append(pool.submit(_write_tables, writers, tables))

        row_base = first_row
        for uri, st, count in zip(inputs, stats, counts):
            _ingest_input(schema, uri, st, row_base, splitter, block_size, bar.update, quarantine, submit,
                          parse_pool)
            if st.read == 0:
                raise DeeplightError(f"{uri}: no data rows")
            if count is not None and st.read != count:
                raise DeeplightError(f"{uri}: changed while being read ({count} rows counted, then {st.read} read)")
            if st.quarantined > max_bad_fraction * st.read:
                raise DeeplightError(
                    f"{uri}: {st.quarantined} of {st.read} rows are bad (more than max_bad_fraction="
                    f"{max_bad_fraction}); first: {'; '.join(st.first_bad)}")
            row_base += st.read
        for f in pending:
            f.result()
        # Each split's last row group is written on close; the parse threads are idle now, so the splits close in
        # parallel instead of one after another on a single core.
        for f in [parse_pool.submit(w.close) for w in writers]:
            f.result()

        report = {
            "dataset": schema.name,
            "inputs": [st.report() for st in stats],
            "read": sum(st.read for st in stats),
            "written": sum(st.written for st in stats),
            "quarantined": sum(st.quarantined for st in stats),
            "splits": {name: w.rows for name, w in zip(SPLITS, writers)},
            "split": list(fractions),
            "split_mode": split_mode,
            "seed": seed,
        }
        if report["written"] != sum(report["splits"].values()):
            raise RuntimeError(f"wrote {sum(report['splits'].values())} rows, counted {report['written']}")
        write_json(tmp / "dataset.json", {"dataset": schema.name,
                                          "columns": [[c.name, c.kind] for c in schema.columns]})
        write_json(tmp / "report.json", report)
    return report


def _write_tables(writers: list[_SplitWriter], tables: list[pa.Table | None]) -> None:
    for w, t in zip(writers, tables):
        if t is not None and t.num_rows:
            w.write(t)


def _ingest_input(schema: DatasetSchema, uri: str, st: _InputStats, row_base: int,
                  splitter: Callable[[np.ndarray], np.ndarray], block_size: int, progress: Callable[[int], object],
                  quarantine: TextIO, submit: Callable[[list[pa.Table | None]], None], parse_pool: Executor) -> None:
    """Stream one input: quarantine its bad lines, count into `st`, hand each block's split tables to `submit`.

    Blocks are parsed in `parse_pool` (the compiled parser releases the GIL), a few ahead of the one being
    consumed; results are consumed in file order, so the output does not depend on the number of threads.
    """
    first_line = 1  # source line number of the next block's first line
    lines_read = 0  # data lines in the blocks submitted so far
    try_fast = True  # after a block with whole-line problems, skip the (then wasted) fast parse attempt
    in_flight: deque[tuple[Future, int]] = deque()

    def consume() -> None:
        nonlocal try_fast
        future, block_first_line = in_flight.popleft()
        res = future.result()
        try_fast = not res.whole_line_problems
        for i, fld, kind, reason, text in zip(res.bad.rows, res.bad.fields, res.bad.kinds, res.bad.reasons,
                                              res.texts):
            line = block_first_line + i
            quarantine.write(json.dumps({"file": uri, "line": line, "reason": reason, "field": fld,
                                         "kind": kind, "text": text}) + "\n")
            if len(st.first_bad) < 3:
                st.first_bad.append(f"line {line}: {reason}")
        st.reasons.update(res.bad.kinds)
        st.read += res.lines
        st.quarantined += len(res.bad.rows)
        st.written += res.lines - len(res.bad.rows)
        submit(res.tables)

    with open_input(uri) as stream:
        for block in _blocks(stream, uri, block_size, progress):
            if first_line == 1:
                if block.startswith(_BOM):  # a UTF-8 byte-order mark is not part of the first line
                    block = block[len(_BOM):]
                if schema.header:
                    cut = block.find(b"\n") + 1 or len(block)
                    _check_header(schema, uri, block[:cut].rstrip(b"\n"))
                    block, first_line = block[cut:], 2
                if not block:
                    continue
            lines = count_lines(block)
            in_flight.append((parse_pool.submit(_process_block, schema, block, row_base + lines_read, splitter,
                                                 try_fast), first_line))
            first_line += lines
            lines_read += lines
            while len(in_flight) > PARSE_AHEAD:
                consume()
        while in_flight:
            consume()
