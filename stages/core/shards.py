"""Parquet image shards: how images travel between stages.

A shard folder holds ``part-00000.parquet``, ``part-00001.parquet``, ... Each row is one image:
its encoded bytes (``image``) plus metadata. ``id`` is the sha256 of the bytes, so equal bytes
are stored once. ``datasets.load_dataset("parquet", data_files=".../*.parquet")`` reads them.
Intermediate stages write tables of ids and scores (``write_table``), not copies of images.
A shard that cannot be read (truncated, not parquet, wrong columns) stops the reader with
:class:`ShardError` naming the file and the stage to rerun, never a bare pyarrow traceback.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.io import atomic_file

# Columns of every image shard (data/raw, data/curated). Optional text fields may be null.
IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("artist", pa.string()),
        ("title", pa.string()),
        ("style", pa.string()),
        ("genre", pa.string()),
        ("date", pa.string()),
        ("description", pa.string()),
        ("caption", pa.string()),
        ("license", pa.string()),
        ("provenance", pa.string()),
        ("repeats", pa.int32()),  # kohya N_name folders (data.source=folder): seen N times per epoch; null = 1
    ]
)


class ShardError(SystemExit):
    """A parquet shard that cannot be read (exits with a message naming the file)."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"cannot read parquet shard {path}: {type(exc).__name__}: {str(exc)[:300]}. The file is "
                         "corrupt or not a shard of this pipeline: rerun the stage that writes its folder "
                         "(`dvc repro -f <stage>`, or `dvc checkout` to restore it from the cache)") from None


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _conform(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def write_table(table: pa.Table, path: Path | str) -> Path:
    """Write one parquet file atomically (deterministic bytes for equal tables)."""
    path = Path(path)
    with atomic_file(path, ".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=True, write_statistics=True)
    return path


def write_shards(rows: Iterable[dict], out_dir: Path | str, shard_rows: int,
                 schema: pa.Schema = IMAGE_SCHEMA) -> list[Path]:
    """Write rows (dicts; missing keys become null) into numbered shards under ``out_dir``.
    The caller makes ``out_dir`` atomic (``io.atomic_dir``); each shard is atomic too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, buf = [], []
    for row in rows:
        buf.append(row)
        if len(buf) >= shard_rows:
            paths.append(write_table(_conform(buf, schema), out_dir / f"part-{len(paths):05d}.parquet"))
            buf = []
    if buf or not paths:
        paths.append(write_table(_conform(buf, schema), out_dir / f"part-{len(paths):05d}.parquet"))
    return paths


def shard_files(folder: Path | str) -> list[Path]:
    files = sorted(Path(folder).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet shards in {folder}: run the stage that writes it first")
    return files


def read_table(folder: Path | str, columns: Optional[list[str]] = None,
               ids: Optional[Iterable[str]] = None) -> pa.Table:
    """All shards of a folder as one table (``columns`` to skip image bytes; ``ids`` to select
    rows, returned in the shards' order)."""
    tables = []
    for f in shard_files(folder):
        with _reading(f):
            tables.append(pq.read_table(f, columns=columns))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if ids is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["id"], value_set=pa.array(list(ids), pa.string())))
    return table


def iter_rows(folder: Path | str, columns: Optional[list[str]] = None,
              ids: Optional[set[str]] = None, batch_size: int = 64) -> Iterator[dict]:
    """Stream rows (dicts) shard by shard without loading every image at once."""
    for f in shard_files(folder):
        with _reading(f):
            batches = iter(pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns))
        while True:
            with _reading(f):  # only pyarrow's reading, not the consumer's code, is in the guard
                batch = next(batches, None)
                rows = batch.to_pylist() if batch is not None else None
            if rows is None:
                break
            for row in rows:
                if ids is None or row["id"] in ids:
                    yield row
