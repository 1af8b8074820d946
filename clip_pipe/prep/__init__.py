"""Data preparation: caption tables or in-memory images -> validated, deterministic WebDataset shards."""

from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.evalset import DEFAULT_TEMPLATES, read_lines, write_eval_set
from clip_pipe.prep.images import DEFAULT_MAX_PIXELS, Rejected, encode_image
from clip_pipe.prep.samples import EncodeConfig, Row, encode_row
from clip_pipe.prep.tables import read_table, table_rows
from clip_pipe.prep.writer import PrepSummary, ShardInfo

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_TEMPLATES",
    "EncodeConfig",
    "PrepSummary",
    "Rejected",
    "Row",
    "ShardInfo",
    "build_dataset",
    "encode_image",
    "encode_row",
    "read_lines",
    "read_table",
    "table_rows",
    "write_eval_set",
]
