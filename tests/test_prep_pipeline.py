"""The resumable shard pipeline: URLs, streaming tables, dedup, filters, retry, kill-and-resume, verify."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from clip_pipe.prep import EncodeConfig, Row
from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.fetch import DownloadConfig
from clip_pipe.prep.tables import list_tables, stream_rows
from clip_pipe.prep.verify import verify_dataset
from tests.prep_helpers import ImageServer, image_bytes, noise

REPO = Path(__file__).resolve().parents[1]
# Generous enough for a loaded 2-core CI machine; /hang outlasts it by far.
FAST = DownloadConfig(timeout=2.0, num_retries=0, backoff=0.0, max_bytes=1 << 20)


def table(out: Path, name: str) -> list[dict]:
    with open(out / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def samples(out: Path) -> dict[str, dict]:
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def dataset_files(out: Path) -> dict[str, bytes]:
    """Everything that must be identical between equivalent runs (manifest.json records argv)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


def build(rows, out, *, images=None, image_size=16, **kwargs):
    cfg = EncodeConfig(images_dir=images, image_size=image_size, **kwargs.pop("encode", {}))
    kwargs.setdefault("download_cfg", FAST)
    kwargs.setdefault("num_threads", 4)
    return build_dataset(rows, out, cfg, **kwargs)


def run_cli(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "data_prep" / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, **kwargs)


# ---- downloads -------------------------------------------------------------------------------------


def test_downloads_record_each_failure(tmp_path):
    with ImageServer() as server:
        cases = {  # url -> expected outcome
            "/img/1.jpg": "written",
            "/redirect/2/2.jpg": "written",
            "/missing": "failed:HTTP 404",
            "/hang": "failed:timed out",
            "/loop": "failed:more than 5 redirects",
            "/busy": "failed:HTTP 503",
            "/big": "rejected:over the limit",
            "/corrupt.jpg": "rejected:truncated",
        }
        rows = [Row(i, "", f"caption {i}", url=server.url + path) for i, path in enumerate(cases)]
        rows.append(Row(len(rows), "", "bad scheme", url="file:///etc/passwd"))
        start = time.monotonic()
        summary = build(rows, tmp_path / "out", shard_size=4)
        assert time.monotonic() - start < 10, "the hanging endpoint must be cut off by the timeout"
        assert server.hits["/busy"] == 1 and server.hits["/hang"] == 1  # num_retries=0

    out = tmp_path / "out"
    assert (summary.num_rows, summary.num_written, summary.num_failed, summary.num_rejected) == (9, 2, 4, 3)
    got = {int(r["index"]): f"failed:{r['error']}" for r in table(out, "failed")}
    got |= {int(r["index"]): f"rejected:{r['reason']}" for r in table(out, "rejected")}
    got |= {int(k): "written" for k in samples(out)}
    for index, expected in enumerate(cases.values()):
        kind, _, text = expected.partition(":")
        assert got[index].startswith(kind) and text in got[index], (list(cases)[index], got[index])
    assert "not an http(s) URL" in got[8]
    kept = samples(out)["000000001"]
    assert json.loads(kept["json"])["source"].endswith("/redirect/2/2.jpg")
    assert Image.open(io.BytesIO(kept["jpg"])).size == (21, 16)  # a 26x20 source, shorter side to 16
    assert not verify_dataset(out).problems


def test_retries_with_backoff_then_retry_failed_refetches_only_failed_rows(tmp_path):
    paths = ["/img/1.jpg", "/toggle/2.jpg", "/img/3.jpg", "/toggle/4.jpg", "/img/5.jpg"]
    with ImageServer() as server:
        rows = [Row(i, "", f"c{i}", url=server.url + p) for i, p in enumerate(paths)]
        retrying = DownloadConfig(timeout=2.0, num_retries=2, backoff=0.01)
        summary = build(rows, tmp_path / "out", shard_size=2, download_cfg=retrying)
        assert summary.num_failed == 2 and server.hits["/toggle/2.jpg"] == 1  # 404 is not retried at once
        server.hits.clear()
        server.broken = False
        summary = build(rows, tmp_path / "out", shard_size=2, retry_failed=True, download_cfg=retrying)
        assert dict(server.hits) == {"/toggle/2.jpg": 1, "/toggle/4.jpg": 1}, "only failed rows are refetched"
        assert (summary.num_written, summary.num_failed) == (5, 0)
        build(rows, tmp_path / "clean", shard_size=2, download_cfg=retrying)  # all succeed first time
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "clean")


# ---- dedup -----------------------------------------------------------------------------------------


@pytest.fixture
def dup_images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    a = image_bytes(noise((20, 20), seed=1))
    (root / "a.png").write_bytes(a)
    (root / "a_copy.png").write_bytes(a)  # same bytes under another name
    (root / "b.png").write_bytes(image_bytes(noise((20, 20), seed=2)))
    return root


DUP_ROWS = [
    ("a.png", "a cat"),  # 0 kept
    ("b.png", "a dog"),  # 1 kept
    ("a.png", "a cat"),  # 2 exact duplicate of 0
    ("a.png", "a kitten"),  # 3 same image, other caption: kept by exact, a duplicate by image
    ("a_copy.png", "a cat"),  # 4 same bytes and caption as 0: exact duplicate (other shard)
    ("b.png", "a dog"),  # 5 exact duplicate of 1
]


@pytest.mark.parametrize(
    ("mode", "expected_dups"),
    [("exact", {2: 0, 4: 0, 5: 1}), ("image", {2: 0, 3: 0, 4: 0, 5: 1}), ("none", {})],
)
def test_dedup_modes(dup_images, tmp_path, mode, expected_dups):
    rows = [Row(i, image, caption) for i, (image, caption) in enumerate(DUP_ROWS)]
    out = tmp_path / mode
    summary = build(rows, out, images=dup_images, shard_size=4, dedup=mode)
    assert summary.num_duplicates == len(expected_dups)
    assert summary.num_written + summary.num_duplicates == len(rows)
    dups = {int(r["index"]): int(r["duplicate_of_index"]) for r in table(out, "duplicates")}
    assert dups == expected_dups
    assert all(
        r["duplicate_of_key"] == f"{int(r['duplicate_of_index']):09d}" for r in table(out, "duplicates")
    )
    assert sorted(samples(out)) == [f"{i:09d}" for i in range(len(rows)) if i not in expected_dups]
    assert json.loads((out / "manifest.json").read_text())["num_duplicates"] == len(expected_dups)
    assert not verify_dataset(out).problems
    # Finalizing again (a rerun) changes nothing.
    before = dataset_files(out)
    build(rows, out, images=dup_images, shard_size=4, dedup=mode)
    assert dataset_files(out) == before


# ---- filters and bad rows --------------------------------------------------------------------------


def test_filters_and_bad_rows_have_reasons(tmp_path, monkeypatch):
    from tests.test_prep import png_header_only

    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(image_bytes(noise((40, 30))))
    (root / "tiny.png").write_bytes(image_bytes(noise((8, 40))))
    (root / "strip.png").write_bytes(image_bytes(noise((200, 20))))
    (root / "bomb.png").write_bytes(png_header_only(9000, 9000))
    good = image_bytes(noise((64, 64)), "JPEG")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "secret.png").write_bytes(image_bytes(noise((40, 40))))
    cases = [
        ("ok.png", "a fine picture", None),
        ("tiny.png", "a fine picture", "image too small"),
        ("strip.png", "a fine picture", "aspect ratio 10.0"),
        ("bomb.png", "a fine picture", "decompression bomb"),
        ("truncated.jpg", "a fine picture", "truncated"),
        ("missing.png", "a fine picture", "not found"),
        ("../../etc/passwd", "a fine picture", "outside"),
        ("../secret.png", "a fine picture", "outside"),
        ("ok.png", "hi", "caption shorter than 5"),
    ]
    opened = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: opened.append(p.resolve()) or read_bytes(p))
    rows = [Row(i, image, caption) for i, (image, caption, _) in enumerate(cases)]
    encode = {"min_side": 10, "max_aspect_ratio": 4.0, "min_caption_chars": 5, "max_pixels": 10**6}
    summary = build(rows, tmp_path / "out", images=root, encode=encode)

    assert Path("/etc/passwd") not in opened and (tmp_path / "secret.png").resolve() not in opened
    assert (summary.num_written, summary.num_rejected) == (1, len(cases) - 1)
    reasons = {int(r["index"]): r["reason"] for r in table(tmp_path / "out", "rejected")}
    for index, (_, _, expected) in enumerate(cases):
        assert (index not in reasons) if expected is None else expected in reasons[index], reasons.get(index)


def test_streams_several_tables_and_a_non_utf8_caption(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(7):
        (root / f"{i}.png").write_bytes(image_bytes(noise((20, 20), seed=i)))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.csv").write_bytes(b"image,caption\n0.png,zero\n1.png,caf\xe9 latin-1\n2.png,two\n")
    pd.DataFrame({"image": ["3.png", "4.png"], "caption": ["three", "four"]}).to_parquet(inputs / "b.parquet")
    pd.DataFrame({"image": ["5.png", "6.png"], "caption": ["five", "six"]}).to_json(
        inputs / "c.jsonl", orient="records", lines=True
    )
    (inputs / "notes.md").write_text("not a table")
    tables = list_tables([inputs])
    assert [p.name for p in tables] == ["a.csv", "b.parquet", "c.jsonl"]
    rows = stream_rows(tables, image_col="image", caption_col="caption", chunk_rows=2)
    summary = build(rows, tmp_path / "out", images=root, shard_size=3)

    assert (summary.num_rows, summary.num_written, summary.num_rejected) == (7, 6, 1)
    assert table(tmp_path / "out", "rejected")[0]["reason"] == "caption is not valid UTF-8"
    got = {k: s["txt"].decode() for k, s in samples(tmp_path / "out").items()}
    assert got == {
        f"{i:09d}": c for i, c in enumerate(["zero", None, "two", "three", "four", "five", "six"]) if c
    }


def test_rerun_with_other_settings_is_refused(dup_images, tmp_path):
    rows = [Row(0, "a.png", "a cat")]
    build(rows, tmp_path / "out", images=dup_images)
    with pytest.raises(ValueError, match=r"other settings.*encode"):
        build(rows, tmp_path / "out", images=dup_images, image_size=32)


# ---- scale-out -------------------------------------------------------------------------------------


def test_slurm_array_split_matches_one_process(tmp_path):
    """slurm/prep.sbatch run by bash as 3 array tasks (ids 4..6), then as the dependent finalize job."""
    root = tmp_path / "images"
    root.mkdir()
    lines = ["image,caption"]
    for i in range(23):
        (root / f"{i}.png").write_bytes(image_bytes(noise((20, 20), seed=i % 20)))
        lines.append(f"{i}.png,picture {i % 20}")
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    args = ["--images", root, "--captions", tmp_path / "c.csv", "--shard-size", "4", "--image-size", "16"]

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(REPO)}
    script = [str(REPO / "slurm" / "prep.sbatch"), *map(str, args), "--out", str(tmp_path / "array")]
    for task_id in (6, 4):  # task 5 "fails": the finalize job must build its shards itself
        array_env = {
            "SLURM_ARRAY_TASK_ID": str(task_id),
            "SLURM_ARRAY_TASK_MIN": "4",
            "SLURM_ARRAY_TASK_COUNT": "3",
        }
        proc = subprocess.run(["bash", *script], env={**env, **array_env}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"task {task_id - 4} of 3" in proc.stdout
    done = sorted(p.name for p in (tmp_path / "array").glob("*.stats.json"))
    assert done == [f"shard-{i:06d}.stats.json" for i in (0, 2, 3, 5)]  # shards 0,3 (task 0) and 2,5 (task 2)
    proc = subprocess.run(["bash", *script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "23 rows = 20 written to 6 shards + 0 rejected" in proc.stdout
    assert "3 duplicates" in proc.stdout  # rows 20-22 repeat rows 0-2

    proc = run_cli("make_shards.py", *args, "--out", tmp_path / "single", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert dataset_files(tmp_path / "array") == dataset_files(tmp_path / "single")
    assert run_cli("verify.py", tmp_path / "array").returncode == 0


# ---- atomic, resumable, reproducible ---------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    num_rows = 240
    with ImageServer(delay=0.02) as server:
        lines = ["url,caption"] + [
            f"{server.url}/slowimg/{i % 200}.jpg,photo number {i % 200}" for i in range(num_rows)
        ]
        lines[5] = f"{server.url}/missing,a lost photo"
        (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
        common = [
            "--captions",
            tmp_path / "urls.csv",
            "--url-col",
            "url",
            "--shard-size",
            "10",
            "--image-size",
            "16",
        ]
        common += ["--threads", "2", "--timeout", "5"]
        out = tmp_path / "killed"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [
            sys.executable,
            str(REPO / "data_prep" / "make_shards.py"),
            *map(str, common),
            "--out",
            str(out),
        ]
        proc = subprocess.Popen(
            [*command, "--workers", "2"], env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(list(out.glob("*.stats.json"))) < 4:
            assert proc.poll() is None, "finished before it could be killed; make the job longer"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as SLURM or the OOM killer do
        proc.wait()
        time.sleep(0.5)  # let the server count requests the killed job had already sent

        num_done = len(list(out.glob("*.stats.json")))
        assert 4 <= num_done < num_rows // 10, "killed mid-run"
        for tar in out.glob("*.tar"):  # whatever is visible under a shard name is a complete tar
            with tarfile.open(tar) as f:  # a cut member's read raises; each is a whole file
                assert all(m.isfile() and len(f.extractfile(m).read()) == m.size for m in f), tar
        assert not (out / "manifest.json").exists()
        finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.stats.json")}

        hits_before = sum(server.hits.values())
        resumed = subprocess.run(
            [*command, "--workers", "2"], env=env, capture_output=True, text=True, timeout=120
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        num_refetched = sum(server.hits.values()) - hits_before
        expected = num_rows - 10 * num_done
        assert num_refetched == expected, (
            f"fetched {num_refetched}, not the {expected} rows of unfinished shards"
        )
        assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished
        assert "240 rows = 200 written to 24 shards + 0 rejected" in resumed.stdout
        assert "+ 39 duplicates (duplicates.csv) + 1 failed downloads" in resumed.stdout

        reference = subprocess.run(
            [*command[:-1], str(tmp_path / "reference"), "--workers", "1"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert reference.returncode == 0, reference.stderr
    assert dataset_files(out) == dataset_files(tmp_path / "reference"), "same bytes as an uninterrupted run"
    assert not list(out.glob(".*.tmp"))
    with tarfile.open(out / "shard-000003.tar") as f:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in f} == {(0, 0, 0, "")}
        names = f.getnames()
    assert names[:3] == ["000000030.jpg", "000000030.txt", "000000030.json"]
    assert run_cli("verify.py", out).returncode == 0


# ---- verify ----------------------------------------------------------------------------------------


def test_verify_catches_truncation_count_mismatch_and_corrupt_images(dup_images, tmp_path):
    rows = [Row(i, "b.png" if i % 2 else "a.png", f"caption {i}") for i in range(6)]
    good = tmp_path / "good"
    build(rows, good, images=dup_images, shard_size=3)
    ok = run_cli("verify.py", good)
    assert ok.returncode == 0 and "2 shards, 6 samples" in ok.stdout and "OK" in ok.stdout

    def broken_copy(name: str) -> Path:
        copy = tmp_path / name
        copy.mkdir()
        for p in good.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        return copy

    truncated = broken_copy("truncated")
    data = (truncated / "shard-000001.tar").read_bytes()
    (truncated / "shard-000001.tar").write_bytes(data[: len(data) // 2])

    miscounted = broken_copy("miscounted")
    sizes = json.loads((miscounted / "sizes.json").read_text())
    sizes["shard-000000.tar"] += 1
    (miscounted / "sizes.json").write_text(json.dumps(sizes))

    corrupt = broken_copy("corrupt")
    with (
        tarfile.open(good / "shard-000000.tar") as src,
        tarfile.open(corrupt / "shard-000000.tar", "w") as dst,
    ):
        for member in src:
            content = src.extractfile(member).read()
            if member.name == "000000002.jpg":
                content = content[:200] + bytes(len(content) - 200)  # header intact, image data zeroed
            dst.addfile(member, io.BytesIO(content))

    expected = {
        truncated: ["shard-000001.tar: size or sha256 differs", "shard-000001.tar: truncated"],
        miscounted: ["holds 3 samples, sizes.json says 4"],
        corrupt: ["sample 000000002's image does not decode"],
    }
    for folder, messages in expected.items():
        result = run_cli("verify.py", folder)
        assert result.returncode == 1, result.stdout
        for message in messages:
            assert message in result.stdout, (folder.name, result.stdout)
    gone = broken_copy("gone")
    (gone / "rejected.csv").write_text("index,image,caption,reason\n1,x,y,z\n")
    assert "rejected.csv lists 1 rows" in run_cli("verify.py", gone).stdout


def test_a_crash_before_the_rename_leaves_no_shard_and_a_rerun_completes(dup_images, tmp_path, monkeypatch):
    import clip_pipe.prep.dataset as dataset

    rows = [Row(i, "b.png" if i % 2 else "a.png", f"caption {i}") for i in range(9)]
    real_replace = os.replace

    def crash_on_second_shard(src, dst):
        if Path(dst).name == "shard-000001.tar":
            raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch and tidy it
        real_replace(src, dst)

    monkeypatch.setattr(dataset.os, "replace", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build(rows, tmp_path / "out", images=dup_images, shard_size=3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"], (
        "only complete shards are visible"
    )
    assert len(list(out.glob(".shard-000001.tar.*.tmp"))) == 1 and not (out / "manifest.json").exists()
    monkeypatch.setattr(dataset.os, "replace", real_replace)
    build(rows, out, images=dup_images, shard_size=3)
    build(rows, tmp_path / "clean", images=dup_images, shard_size=3)
    assert dataset_files(out) == dataset_files(tmp_path / "clean")
