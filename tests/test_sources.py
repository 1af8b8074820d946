"""data.train -> shards with counts: folders, brace patterns, '::', s3/http/file/pipe URLs, img2dataset's
layout; counts from sizes.json, *_stats.json or data.num_samples, read where the shards are."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_pipe.config import SourceConfig
from clip_pipe.data import ShardReader, batch_loader, build_stream, expand, list_shards, list_sources
from clip_pipe.data.augment import TrainAugment
from clip_pipe.distributed import free_port
from tests.conftest import REPO, write_train_shards
from tests.remote_helpers import write_img2dataset_shards

SIZES = [7, 5, 3]


def without_url(samples) -> list[dict]:
    return [{k: v for k, v in sample.items() if k != "__url__"} for sample in samples]


def counts(shards) -> list[tuple[str, int]]:
    return [(Path(s.url).name, s.num_samples) for s in shards]


def test_expand_splits_at_double_colons_then_braces():
    assert expand(["/a/{0..2}.tar::s3://b/x/{08..10}.tar", "/c"]) == [
        "/a/0.tar", "/a/1.tar", "/a/2.tar", "s3://b/x/08.tar", "s3://b/x/09.tar", "s3://b/x/10.tar", "/c",
    ]  # fmt: skip
    assert expand(["pipe:aws s3 cp s3://b/{0..1}.tar -"]) == [
        "pipe:aws s3 cp s3://b/0.tar -",
        "pipe:aws s3 cp s3://b/1.tar -",
    ]


def test_img2dataset_folder_brace_pattern_and_file_url_agree(tmp_path):
    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    expected = [("00000.tar", 7), ("00001.tar", 5), ("00002.tar", 3)]
    assert counts(list_shards([str(folder)])) == expected  # a folder: its *.tar, counted by *_stats.json
    assert counts(list_shards([f"{folder}/{{00000..00002}}.tar"])) == expected
    assert counts(list_shards([f"file://{folder}/{{00000..00001}}.tar", f"{folder}/00002.tar"])) == expected
    # Several sources at once, in the order given, as open_clip's '::'
    ours = write_train_shards(tmp_path / "ours", [4, 2])
    mixed = list_shards([f"{ours}::{folder}/{{00001..00002}}.tar"])
    assert counts(mixed) == [
        ("shard-000000.tar", 4),
        ("shard-000001.tar", 2),
        ("00001.tar", 5),
        ("00002.tar", 3),
    ]


def test_counts_come_from_sizes_json_then_stats_then_num_samples(tmp_path):
    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 6}))  # wins over 00000_stats.json's 7
    (folder / "00002_stats.json").unlink()  # 00002.tar: no count file at all
    pattern = f"{folder}/{{00000..00002}}.tar"
    with pytest.raises(ValueError) as error:
        list_shards([pattern])
    message = str(error.value)
    assert "1 of 3 shards have no sample count" in message and "00002.tar" in message
    assert "sizes.json" in message and "_stats.json" in message and "data.num_samples" in message
    assert "\n" not in message
    # data.num_samples is the total: the uncounted shards share what the counted ones leave
    assert counts(list_shards([pattern], num_samples=6 + 5 + 4)) == [
        ("00000.tar", 6),
        ("00001.tar", 5),
        ("00002.tar", 4),
    ]
    with pytest.raises(ValueError, match=r"data.num_samples \(11\) leaves 0 samples"):
        list_shards([pattern], num_samples=11)
    # with no count file anywhere, data.num_samples is spread evenly (the first shards take the remainder)
    for path in folder.glob("*.json"):
        path.unlink()
    assert [s.num_samples for s in list_shards([pattern], num_samples=10)] == [4, 3, 3]


def test_a_folder_of_ours_still_reads_as_before(tmp_path):
    folder = write_train_shards(tmp_path / "t", [3, 0, 2])
    assert counts(list_shards([str(folder)])) == [("shard-000000.tar", 3), ("shard-000002.tar", 2)]
    with pytest.raises(ValueError, match="no such shard"):
        list_shards([f"{folder}/shard-00000{{0..3}}.tar"])
    with pytest.raises(ValueError, match="no such folder"):
        list_shards([str(tmp_path / "nowhere")])


def test_img2dataset_samples_train_without_conversion(tmp_path):
    """K.jpg / K.png / K.webp + K.txt + K.json, as img2dataset writes them, make batches as they are."""
    folder = write_img2dataset_shards(tmp_path / "laion", [6, 6])
    sources = list_sources([SourceConfig([str(folder)])])
    augment = TrainAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    from open_clip.tokenizer import SimpleTokenizer

    stream, _ = build_stream(
        sources, 4, augment, SimpleTokenizer(context_length=16), 0, 1, num_streams=1, seed=0, shuffle_buffer=0
    )
    batches = [b for _, b in zip(range(3), batch_loader(stream, 0), strict=False)]
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(6))
    assert all(b["num_skipped"] == 0 and b["images"].shape == (4, 3, 16, 16) for b in batches)


def test_remote_counts_and_listing_match_local(tmp_path, s3, http):
    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    expected = [("00000.tar", 7), ("00001.tar", 5), ("00002.tar", 3)]
    prefix = s3.upload(folder, "laion")
    assert counts(list_shards([prefix])) == expected  # an S3 folder: listed, *_stats.json read
    assert counts(list_shards([prefix + "{00000..00002}.tar"])) == expected
    shutil.copytree(folder, http.root / "laion")
    assert counts(list_shards([http.url("laion/{00000..00002}.tar")])) == expected
    # sizes.json is read remotely too, and wins
    s3.client.put_object(Bucket=s3.bucket, Key="laion/sizes.json", Body=json.dumps({"00001.tar": 4}))
    assert counts(list_shards([prefix + "{00000..00002}.tar"])) == [
        ("00000.tar", 7),
        ("00001.tar", 4),
        ("00002.tar", 3),
    ]
    assert counts(list_shards([prefix])) == [("00001.tar", 4)]  # a folder with sizes.json: its shards
    with pytest.raises(ValueError, match="cannot be listed"):
        list_shards([http.url("laion/")])


def test_pipe_commands_read_and_count_beside_their_shard(tmp_path):
    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    shards = list_shards([f"pipe:cat {folder}/{{00000..00002}}.tar"])
    assert [s.num_samples for s in shards] == SIZES
    reader = ShardReader()
    for shard in shards:
        local = without_url(ShardReader().samples(shard.url.removeprefix("pipe:cat ")))
        assert without_url(reader.samples(shard.url)) == local
    with pytest.raises(ValueError, match="'no-such-command' is not an installed command"):
        list_shards([f"pipe:no-such-command {folder}/00000.tar"])
    # A command that fails part-way: the samples before are kept, then an OSError (counted by the stream)
    # (cut where a header starts, so the tar itself looks whole: only the exit status tells)
    cut = f"pipe:head -c 2560 {folder}/00000.tar; exit 3"
    samples = []
    with pytest.raises(OSError, match="exit status 3"):
        for sample in reader.samples(cut):
            samples.append(sample)
    assert 0 < len(samples) < 7


def test_gs_urls_need_gcsfs():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match=r"gs:// URLs need fsspec's gs backend \(pip install gcsfs\)"):
        list_shards(["gs://bucket/laion/{00000..00002}.tar"])


# --- start-up: a wrong endpoint, path or credentials fail at once, in one line


def test_unreachable_endpoint_fails_fast_in_one_line(monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        list_shards(["s3://bucket/laion/{00000..00002}.tar"])
    assert time.monotonic() - start < 20
    message = str(error.value)
    assert "cannot reach the S3 endpoint" in message and closed in message and "\n" not in message
    with pytest.raises(ValueError, match="cannot reach the server"):
        list_shards([f"{closed}/laion/{{00000..00002}}.tar"])


def test_missing_bucket_or_shard_is_a_clear_error(s3, http):
    with pytest.raises(ValueError, match="not found"):
        list_shards([s3.url("nothing/{00000..00002}.tar")], num_samples=10)
    with pytest.raises(ValueError, match="not found"):
        list_shards(["s3://no-such-bucket-here/{00000..00002}.tar"], num_samples=10)
    with pytest.raises(ValueError, match="not found"):
        list_shards([http.url("nothing/{00000..00002}.tar")], num_samples=10)


@pytest.mark.slow
def test_bad_credentials_fail_training_at_start_up_in_one_line(tmp_path, s3, monkeypatch):
    """`launch/train.py` against an S3 server that checks credentials: exit 2, one line, no traceback."""
    from moto import settings

    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    url = s3.upload(folder, "laion")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks every request's keys
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "x"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/tiny_test.yaml", f"data.train={url}{{00000..00002}}.tar",
         f"run.out_dir={tmp_path / 'run'}", "eval.sets=[]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "access denied" in error_lines[0] and "AWS_ACCESS_KEY_ID" in error_lines[0]
    assert time.monotonic() - start < 120


# --- start-up at scale: one count file per folder, not one per shard


def test_count_shards_writes_sizes_json_beside_s3_shards(tmp_path, s3, capsys):
    """`clip-pipe count-shards` reads the *_stats.json (and reads a shard that has none) and writes a
    sizes.json beside the shards; from then on a run's start-up reads that one file, no stats file."""
    from clip_pipe.cli import main

    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    (folder / "00002_stats.json").unlink()  # counted by reading the shard
    pattern = s3.upload(folder, "laion") + "{00000..00002}.tar"
    with pytest.raises(ValueError, match="1 of 3 shards have no sample count"):
        list_shards([pattern])
    assert main(["count-shards", pattern]) == 0
    assert f"wrote {s3.url('laion/sizes.json')}" in capsys.readouterr().out
    sizes = s3.client.get_object(Bucket=s3.bucket, Key="laion/sizes.json")["Body"].read()
    assert json.loads(sizes) == {"00000.tar": 7, "00001.tar": 5, "00002.tar": 3}

    s3.faults.reset()
    assert counts(list_shards([pattern])) == [("00000.tar", 7), ("00001.tar", 5), ("00002.tar", 3)]
    gets = [Path(r.path).name for r in s3.faults.gets()]
    assert gets == ["sizes.json"], gets  # (and one HEAD, for the first shard: the endpoint is checked)


def test_count_shards_to_a_counts_file_where_the_shards_are_read_only(tmp_path, http, capsys):
    from clip_pipe.cli import main
    from clip_pipe.config import DataConfig
    from clip_pipe.data import list_sources

    write_img2dataset_shards(http.root / "laion", SIZES)
    pattern = http.url("laion/{00000..00002}.tar")
    assert main(["count-shards", pattern]) == 2
    assert "cannot write to an HTTP server" in capsys.readouterr().err
    out = tmp_path / "counts.json"
    assert main(["count-shards", pattern, "--out", str(out)]) == 0
    expected = {http.url(f"laion/{i:05d}.tar"): n for i, n in enumerate(SIZES)}
    assert json.loads(out.read_text()) == expected

    http.faults.reset()
    data = DataConfig(train=[pattern], counts_file=str(out))
    (source,) = list_sources(data.source_list, counts_file=data.counts_file)
    assert {s.url: s.num_samples for s in source.shards} == expected
    assert [r.method for r in http.faults.log] == ["HEAD"]  # the endpoint checked; no count file read
    with pytest.raises(ValueError, match=r"data\.counts_file"):
        list_sources(data.source_list, counts_file=str(tmp_path / "missing.json"))


def test_count_shards_beside_local_shards(tmp_path):
    from clip_pipe.data.sources import count_shards, write_counts

    folder = write_img2dataset_shards(tmp_path / "laion", SIZES)
    for path in folder.glob("*_stats.json"):
        path.unlink()
    (folder / "sizes.json").write_text(json.dumps({"00009.tar": 4}))  # kept: merged, not replaced
    assert write_counts(count_shards([f"{folder}/{{00000..00001}}.tar"])) == [str(folder / "sizes.json")]
    assert json.loads((folder / "sizes.json").read_text()) == {"00000.tar": 7, "00001.tar": 5, "00009.tar": 4}
