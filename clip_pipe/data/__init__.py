"""The training data path, one stage a file, in the order a sample flows:

sources.py   data.train / data.sources -> weighted sources of shards with their sample counts (folders,
             brace patterns, '::', URLs, pipe:)
order.py     the elastic global order: streams, blocks, the batch layout, each slot's share; positions
open.py      shard URL -> samples: local, remote, pipe: (ShardReader, one per loader slot)
fetch.py     remote shards as byte ranges fetched ahead, one budget shared by a slot's streams
stores.py    byte ranges of remote files: fsspec (s3, gs, ...), httpx (http, https)
retry.py     transient failures retried with backoff, permanent ones lose the shard (counted)
cache.py     the optional bounded local cache of remote shards
tar.py       the lean tar reader
decode.py    header sizes, the pixel limit, uint8 decode (JPEGs at a reduced scale where the crop allows)
augment.py   the training crop (per sample) and normalisation (per batch); views.py the SSL views
stream.py    ImageTextStream and batch_loader: stages -> batches -> the trainer
"""

from clip_pipe.data.cache import ShardCache
from clip_pipe.data.decode import IMAGE_EXTENSIONS, decode_image, decode_uint8
from clip_pipe.data.open import ShardReader, shard_reader
from clip_pipe.data.order import (
    DataOrder,
    LoaderState,
    OrderSpec,
    StreamPosition,
    StreamPositions,
    resume_order,
)
from clip_pipe.data.retry import Retry, ShardUnavailable, StoreUnreachable
from clip_pipe.data.sources import Shard, Source, expand, list_shards, list_sources
from clip_pipe.data.stream import (
    CachedTokenizer,
    ImageTextStream,
    Prefetcher,
    SampleErrors,
    TarBlocks,
    batch_loader,
    build_stream,
)
from clip_pipe.data.tar import TarError, tar_samples

__all__ = [
    "IMAGE_EXTENSIONS",
    "CachedTokenizer",
    "DataOrder",
    "ImageTextStream",
    "LoaderState",
    "OrderSpec",
    "Prefetcher",
    "Retry",
    "SampleErrors",
    "Shard",
    "ShardCache",
    "ShardReader",
    "ShardUnavailable",
    "Source",
    "StoreUnreachable",
    "StreamPosition",
    "StreamPositions",
    "TarBlocks",
    "TarError",
    "batch_loader",
    "build_stream",
    "decode_image",
    "decode_uint8",
    "expand",
    "list_shards",
    "list_sources",
    "resume_order",
    "shard_reader",
    "tar_samples",
]
