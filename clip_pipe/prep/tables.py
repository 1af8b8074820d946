"""Read a caption/label table (CSV, TSV, Parquet, JSON lines) into Rows."""

import math
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


def table_rows(
    table: pd.DataFrame, *, image_col: str, caption_col: str | None = None, label_col: str | None = None
) -> list[Row]:
    """One Row per table row, in order; every other column is kept as JSON-safe `extra`."""
    used = [c for c in (image_col, caption_col, label_col) if c is not None]
    for column in used:
        if column not in table.columns:
            available = ", ".join(map(repr, table.columns)) or "none"
            raise ValueError(f"column {column!r} not found in the table; available columns: {available}")
    extra_cols = [c for c in table.columns if c not in used]

    rows = []
    for index, record in enumerate(table.to_dict("records")):
        image = _missing_to_none(record[image_col])
        caption = None if caption_col is None else _missing_to_none(record[caption_col])
        rows.append(
            Row(
                index=index,
                image="" if image is None else str(image),  # "" is rejected as a missing path
                caption=None if caption is None else str(caption),
                label=None if label_col is None else _missing_to_none(record[label_col]),
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
