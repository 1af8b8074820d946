"""The training data path, one stage a file, in the order a sample flows:

sources.py   data.train -> shards with their sample counts (folders, brace patterns, '::', URLs, pipe:)
open.py      shard URL -> samples: local, fsspec (s3, gs), http(s), pipe:; fetched ahead, retried
cache.py     the optional bounded local cache of remote shards
order.py     which shards each loader slot reads, epoch by epoch; the resumable position
tar.py       the lean tar reader
decode.py    header sizes, the pixel limit, uint8 decode (JPEGs at a reduced scale where the crop allows)
augment.py   the training crop (per sample) and normalisation (per batch); views.py the SSL views
stream.py    ImageTextStream and batch_loader: stages -> batches -> the trainer
"""

from clip_pipe.data.cache import ShardCache
from clip_pipe.data.decode import IMAGE_EXTENSIONS, decode_image, decode_uint8
from clip_pipe.data.open import Retry, ShardReader, ShardUnavailable, shard_reader
from clip_pipe.data.order import LoaderPosition, SlotPosition, assign_shards
from clip_pipe.data.sources import Shard, expand, list_shards
from clip_pipe.data.stream import (
    CachedTokenizer,
    ImageTextStream,
    Prefetcher,
    SampleErrors,
    batch_loader,
    epoch_samples,
    slot_samples,
)
from clip_pipe.data.tar import TarError, tar_samples

__all__ = [
    "IMAGE_EXTENSIONS",
    "CachedTokenizer",
    "ImageTextStream",
    "LoaderPosition",
    "Prefetcher",
    "Retry",
    "SampleErrors",
    "Shard",
    "ShardCache",
    "ShardReader",
    "ShardUnavailable",
    "SlotPosition",
    "TarError",
    "assign_shards",
    "batch_loader",
    "decode_image",
    "decode_uint8",
    "epoch_samples",
    "expand",
    "list_shards",
    "shard_reader",
    "slot_samples",
    "tar_samples",
]
