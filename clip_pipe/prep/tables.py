"""Read caption/label tables (CSV, TSV, Parquet, JSON lines) into Rows, whole or streamed in chunks."""

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clip_pipe.prep.samples import Row

TABLE_FORMATS = {
    ".csv": "CSV",
    ".tsv": "TSV",
    ".parquet": "Parquet",
    ".jsonl": "JSON lines",
    ".json": "JSON lines",
}


def read_table(path: str | Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """The table at `path`, its format chosen by extension. `text_columns` are kept as strings in
    CSV/TSV, so a caption such as "007" or an image name such as "123" is not parsed as a number."""
    path = Path(path)
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(TABLE_FORMATS)
        raise ValueError(f"cannot tell the format of {path} from its extension; use one of {known}")
    if not path.is_file():
        raise ValueError(f"table {path} does not exist")
    try:
        if kind in ("CSV", "TSV"):
            sep = "\t" if kind == "TSV" else ","
            return pd.read_csv(path, sep=sep, dtype=dict.fromkeys(text_columns, str))
        if kind == "Parquet":
            return pd.read_parquet(path)
        # dtype/convert_dates off: keep values as the JSON has them (no "2021-01-01" -> Timestamp).
        return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    # Parser, encoding, Arrow and I/O errors all subclass one of these.
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as {kind}: {e}") from e


def list_tables(paths: Sequence[str | Path]) -> list[Path]:
    """The table files `paths` name, in order; a folder stands for its tables, sorted by name."""
    tables = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_FORMATS and p.is_file())
            if not found:
                raise ValueError(f"folder {path} holds no {', '.join(TABLE_FORMATS)} files")
            tables += found
        elif path.suffix.lower() not in TABLE_FORMATS:
            known = ", ".join(TABLE_FORMATS)
            raise ValueError(f"cannot tell the format of {path} from its extension; use one of {known}")
        elif not path.is_file():
            raise ValueError(f"table {path} does not exist")
        else:
            tables.append(path)
    if not tables:
        raise ValueError("no input tables given")
    return tables


def read_chunks(path: Path, text_columns: tuple[str, ...], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The table at `path` in DataFrames of at most `chunk_rows` rows, so memory stays flat. Bytes that are
    not UTF-8 arrive as U+FFFD (and check_caption rejects the row), rather than failing the whole file."""
    kind = TABLE_FORMATS[path.suffix.lower()]
    try:
        if kind in ("CSV", "TSV"):
            yield from pd.read_csv(
                path,
                sep="\t" if kind == "TSV" else ",",
                dtype=dict.fromkeys(text_columns, str),
                chunksize=chunk_rows,
                encoding_errors="replace",
            )
        elif kind == "Parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        else:
            with pd.read_json(
                path,
                lines=True,
                dtype=False,
                convert_dates=False,
                chunksize=chunk_rows,
                encoding_errors="replace",
            ) as reader:
                yield from reader
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as {kind}: {e}") from e


def stream_rows(
    paths: Sequence[Path],
    *,
    image_col: str | None = None,
    url_col: str | None = None,
    caption_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    chunk_rows: int = 10_000,
) -> Iterator[Row]:
    """Rows of all `paths` in order, numbered across files, read `chunk_rows` at a time. Every table's
    columns are checked before the first row is returned."""
    assert (image_col is None) != (url_col is None), "exactly one of image_col and url_col"
    text_columns = tuple(c for c in (image_col, url_col, caption_col) if c is not None)
    wanted = [c for c in (image_col, url_col, caption_col, label_col, group_col) if c is not None]
    for path in paths:
        columns = list(next(read_chunks(path, text_columns, 1), pd.DataFrame()).columns)
        missing = [c for c in wanted if c not in columns]
        if missing:
            available = ", ".join(map(repr, columns)) or "none"
            raise ValueError(f"{path}: column {missing[0]!r} not found; available columns: {available}")
    return _stream_rows(
        paths, image_col or url_col, url_col is not None, caption_col, label_col, group_col, chunk_rows
    )


def _stream_rows(paths, image_col, urls, caption_col, label_col, group_col, chunk_rows) -> Iterator[Row]:
    index = 0
    text_columns = tuple(c for c in (image_col, caption_col) if c is not None)
    for path in paths:
        for chunk in read_chunks(path, text_columns, chunk_rows):
            try:
                rows = table_rows(
                    chunk,
                    image_col=image_col,
                    caption_col=caption_col,
                    label_col=label_col,
                    group_col=group_col,
                    start=index,
                    urls=urls,
                )
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            yield from rows
            index += len(rows)


def table_rows(
    table: pd.DataFrame,
    *,
    image_col: str,
    caption_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    start: int = 0,
    urls: bool = False,
) -> list[Row]:
    """One Row per table row, in order, numbered from `start`; every other column is kept as JSON-safe
    `extra`. With `urls`, the image column holds URLs to download rather than paths. `group_col` names
    the image a row's caption belongs to (rows of one image share it), for retrieval eval sets."""
    used = [c for c in (image_col, caption_col, label_col, group_col) if c is not None]
    for column in used:
        if column not in table.columns:
            available = ", ".join(map(repr, table.columns)) or "none"
            raise ValueError(f"column {column!r} not found in the table; available columns: {available}")
    extra_cols = [c for c in table.columns if c not in used]

    rows = []
    for index, record in enumerate(table.to_dict("records"), start):
        image = _missing_to_none(record[image_col])
        image = "" if image is None else str(image)  # "" is rejected as a missing path
        caption = None if caption_col is None else _missing_to_none(record[caption_col])
        rows.append(
            Row(
                index=index,
                image="" if urls else image,
                url=image if urls else None,
                caption=None if caption is None else str(caption),
                label=None if label_col is None else _missing_to_none(record[label_col]),
                group=None if group_col is None else str(_missing_to_none(record[group_col])),
                extra={str(c): json_safe(record[c]) for c in extra_cols},
            )
        )
    return rows


def json_safe(value: object) -> object:
    """`value` as plain JSON: numpy scalars unwrapped, NaN/NA -> null, dates -> ISO strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _missing_to_none(value) is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _missing_to_none(value: object) -> object:
    return None if pd.api.types.is_scalar(value) and pd.isna(value) else value
