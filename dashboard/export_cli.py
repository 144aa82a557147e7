"""``megascope export``: a recorded run's steps, events or host samples as CSV, JSON lines or Parquet, for notebooks.

Every node's record of the run directory is read (megascope.protos.recording) and merged in time order. Each row is
a message as :func:`megascope.protos.records.message_record` flattens it (every field by its proto name, enums by
name): JSON lines keep nested fields (a step's collectives, an event's detail) as they are, so
``json_format.ParseDict`` reads a line back into the message; CSV and Parquet hold them as JSON text in their column.
Parquet needs pyarrow: ``pip install 'megascope[parquet]'``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

HELP = "Export a recorded run's steps, events or host samples as CSV, JSON lines or Parquet."
FORMATS = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}
WHAT = ("steps", "events", "hosts", "gpus")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of the agents (their --run-dir)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="csv", help="file format (default csv)")
    parser.add_argument("--what", choices=WHAT, default="steps", help="which messages (default steps)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="where to write ('-': standard output, csv and jsonl only); default RUN_DIR/export/WHAT.FORMAT",
    )


def records(run_dir: str, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of ``what`` from every node's record, oldest first, and the warnings (damage) met on the way."""
    from megascope.dashboard.replay import record_paths
    from megascope.protos.recording import Part, open_records
    from megascope.protos.records import message_record

    part = {"steps": Part.STEP, "events": Part.EVENT, "hosts": Part.HOST, "gpus": Part.GPU}[what]
    rows: list[tuple[float, dict[str, Any]]] = []
    warnings: list[str] = []
    for reader in open_records(record_paths([run_dir])):
        with reader:
            for row, message in reader.messages(part):
                rows.append((row.wall_time, message_record(message)))
            if reader.damage is not None:
                warnings.append(reader.damage)
    rows.sort(key=lambda r: r[0])
    return [r for _, r in rows], warnings


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _flat(value: Any) -> Any:
    """A nested value (list, dict) as JSON text: CSV and Parquet columns hold one scalar each."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def write_csv(rows: list[dict[str, Any]], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _flat(v) for k, v in row.items()})


def write_jsonl(rows: list[dict[str, Any]], out: IO[str]) -> None:
    for row in rows:
        out.write(json.dumps(row) + "\n")


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa  # type: ignore[import-not-found]
    import pyarrow.parquet as pq  # type: ignore[import-not-found]

    columns = _columns(rows)
    table = pa.table({c: [_flat(r.get(c)) for r in rows] for c in columns})
    pq.write_table(table, path)


def _open(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
    else:
        with open(path, "w", newline="") as file:
            yield file


def run(args: argparse.Namespace) -> int:
    from megascope.dashboard.replay import ReplayError
    from megascope.protos.recording import RecordError

    if args.format == "parquet":
        try:
            import pyarrow  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print(
                "megascope export: error: --format parquet needs pyarrow, which is not installed: "
                "pip install 'megascope[parquet]' (or use --format csv or jsonl)",
                file=sys.stderr,
            )
            return 2
        if args.out == "-":
            print("megascope export: error: --out -: Parquet goes to a file, not standard output", file=sys.stderr)
            return 2
    try:
        rows, warnings = records(args.run_dir, args.what)
    except (ReplayError, RecordError) as error:
        print(f"megascope export: error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"megascope export: warning: {warning}", file=sys.stderr)
    out = args.out or str(Path(args.run_dir) / "export" / f"{args.what}{FORMATS[args.format]}")
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    if args.format == "parquet":
        write_parquet(rows, Path(out))
    else:
        write = write_csv if args.format == "csv" else write_jsonl
        for file in _open(out):
            write(rows, file)
    if out != "-":
        print(f"megascope export: {len(rows):,} {args.what} -> {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope export", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
