"""A reader for the IDX format of (Fashion-)MNIST: magic, big-endian dimensions, raw array data."""

import gzip
import math
import struct
from pathlib import Path

import numpy as np

# Third magic byte -> element type; the fourth is the number of dimensions.
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {data[:4].hex() or 'missing'})")
    num_dims = data[3]
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{num_dims}I", data[4:header_size])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes, but its header (shape {shape}) implies {expected}")
    return np.frombuffer(data, dtype, offset=header_size).reshape(shape)
