"""Data prep: tables -> validated, deterministic WebDataset shards and CLIP_benchmark eval sets."""

import csv
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image, ImageFile

from clip_pipe.prep import EncodeConfig, Row, build_dataset, read_table, table_rows, write_eval_set
from clip_pipe.prep.images import Rejected
from clip_pipe.prep.samples import parse_label
from tests.prep_helpers import image_bytes, noise

REPO = Path(__file__).resolve().parents[1]


# ---- tiny inputs, made per test ---------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "red.jpg").write_bytes(image_bytes(Image.new("RGB", (40, 30), (220, 20, 20)), "JPEG"))
    (root / "sub" / "noise.png").write_bytes(image_bytes(noise((30, 60)), "PNG"))
    (root / "gray.webp").write_bytes(image_bytes(Image.new("L", (16, 16), 90), "WEBP"))
    return root


def write_table(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


def build(images: Path, rows, out: Path, *, image_size=16, labels=False, **kwargs):
    cfg = EncodeConfig(images_dir=images, image_size=image_size, labels=labels)
    return build_dataset(rows, out, cfg, **kwargs)


def read_samples(out: Path, pattern: str = "*.tar") -> dict[str, dict]:
    urls = sorted(str(p) for p in out.glob(pattern))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)} if urls else {}


def decode(jpg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpg))
    assert image.format == "JPEG"
    return image.convert("RGB")


def rejected_rows(out: Path) -> list[dict]:
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_cli(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "data_prep" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# ---- happy path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_table_formats_round_trip(images, tmp_path, suffix):
    df = pd.DataFrame(
        {
            "image": ["red.jpg", "sub/noise.png", "gray.webp"],
            "caption": ["a red block", '  static, with "quotes"\tand a tab ', "ünïcödé grey"],
            "label": [3, 0, 7],
            "url": ["http://a", "http://b", None],
            "score": [0.5, float("nan"), 2.0],
        }
    )
    table = read_table(write_table(df, tmp_path / f"captions{suffix}"), ("image", "caption"))
    rows = table_rows(table, image_col="image", caption_col="caption", label_col="label")
    out = tmp_path / "out"
    summary = build(images, rows, out, labels=True, shard_size=2)

    assert (summary.num_rows, summary.num_written, summary.num_rejected) == (3, 3, 0)
    assert [s.name for s in summary.shards] == ["shard-000000.tar", "shard-000001.tar"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_rows"], manifest["num_written"], manifest["num_rejected"]) == (3, 3, 0)
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert shard["num_samples"] == sizes[shard["name"]]
    assert rejected_rows(out) == []
    assert not list(out.glob("*.tmp"))

    samples = read_samples(out)
    assert list(samples) == ["000000000", "000000001", "000000002"]
    for key, (_, expected) in zip(samples, df.iterrows(), strict=True):
        sample = samples[key]
        assert set(sample) >= {"jpg", "txt", "json", "cls"}
        assert sample["txt"].decode() == expected.caption.strip()
        assert int(sample["cls"]) == expected.label
        meta = json.loads(sample["json"])
        source = (images / expected.image).read_bytes()
        assert meta["source"] == expected.image
        assert meta["sha256"] == hashlib.sha256(source).hexdigest()
        assert (meta["width"], meta["height"]) == Image.open(images / expected.image).size
        assert meta["caption"] == expected.caption.strip()
        assert meta["extra"] == {
            "url": None if pd.isna(expected.url) else expected.url,
            "score": None if np.isnan(expected.score) else expected.score,
        }
        assert min(decode(sample["jpg"]).size) == 16


def test_alpha_is_composited_onto_white(tmp_path):
    files = {
        "rgba.png": image_bytes(Image.new("RGBA", (12, 12), (255, 0, 0, 0)), "PNG"),
        "la.png": image_bytes(Image.new("LA", (12, 12), (0, 0)), "PNG"),
        # Every pixel is palette entry 0 (black), which the tRNS chunk declares transparent.
        "p.png": image_bytes(Image.new("P", (12, 12), 0), "PNG", transparency=0),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = [Row(i, name, "see-through") for i, name in enumerate(files)]
    summary = build(tmp_path, rows, tmp_path / "out", image_size=12)
    assert summary.num_written == 3
    for sample in read_samples(tmp_path / "out").values():
        assert np.asarray(decode(sample["jpg"])).min() >= 250, "transparent pixels must come out white"


def test_exif_orientation_and_resize(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    (tmp_path / "rotated.jpg").write_bytes(image_bytes(noise((20, 10)), "JPEG", exif=exif))
    (tmp_path / "wide.png").write_bytes(image_bytes(noise((40, 30)), "PNG"))
    (tmp_path / "small.png").write_bytes(image_bytes(noise((8, 6)), "PNG"))
    rows = [Row(0, "rotated.jpg", "r"), Row(1, "wide.png", "w"), Row(2, "small.png", "s")]
    build(tmp_path, rows, tmp_path / "out", image_size=12)
    samples = read_samples(tmp_path / "out")
    assert decode(samples["000000000"]["jpg"]).size == (12, 24)  # portrait after orientation
    assert json.loads(samples["000000000"]["json"])["width"] == 10
    assert decode(samples["000000001"]["jpg"]).size == (16, 12)  # downscaled, aspect kept
    assert decode(samples["000000002"]["jpg"]).size == (16, 12)  # upscaled too


def test_16_bit_grayscale_keeps_its_tone(tmp_path):
    (tmp_path / "deep.png").write_bytes(
        image_bytes(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG")
    )
    build(tmp_path, [Row(0, "deep.png", "mid grey")], tmp_path / "out", image_size=8)
    pixels = np.asarray(decode(read_samples(tmp_path / "out")["000000000"]["jpg"]))
    assert abs(pixels.mean() - 128) < 3  # not clipped to white


# ---- every bad row is a rejection, never a crash --------------------------------------------


def test_bad_rows_are_rejected_with_reasons(images, tmp_path, monkeypatch):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(image_bytes(noise((8, 8)), "JPEG"))
    (images / "link.jpg").symlink_to(outside)
    good = image_bytes(noise((64, 64)), "JPEG")
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(image_bytes(noise((32, 32)), "PNG"))
    corrupt[100:300] = bytes(200)  # a valid header over a broken data stream
    (images / "corrupt.png").write_bytes(corrupt)
    (images / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    (images / "notes.txt").write_text("not an image")
    (images / "bomb.png").write_bytes(png_header_only(9000, 9000))  # 81 Mpx: over our 64 Mpx limit
    (images / "big_bomb.png").write_bytes(png_header_only(30000, 30000))  # over PIL's own hard limit
    cases = {  # image, caption, label -> expected reason
        ("red.jpg", "fine", 1): None,
        ("truncated.jpg", "x", 1): "truncated",
        ("corrupt.png", "x", 1): "cannot decode",
        ("notes.txt", "x", 1): "not a recognised image",
        ("garbage.jpg", "x", 1): "not a recognised image",
        ("missing.jpg", "x", 1): "not found",
        ("sub", "x", 1): "directory",
        ("red.jpg", "   ", 1): "caption is empty",
        ("red.jpg", float("nan"), 1): "caption is missing",
        ("../../etc/passwd", "x", 1): "outside",
        (str(outside), "x", 1): "outside",
        ("link.jpg", "x", 1): "outside",
        ("sub/../../secret.jpg", "x", 1): "outside",
        ("bomb.png", "x", 1): "decompression bomb",
        ("big_bomb.png", "x", 1): "decompression bomb",
        ("red.jpg", "x", "cat"): "not an integer",
        ("red.jpg", "x", 2.5): "not an integer",
        ("red.jpg", "x", -1): "out of range",
        ("red.jpg", "x", float("nan")): "label is missing",
        (float("nan"), "x", 1): "image path is missing",
    }
    df = pd.DataFrame(list(cases), columns=["image", "caption", "label"], dtype=object)

    opened, decoded = [], []
    read_bytes, load = Path.read_bytes, ImageFile.ImageFile.load
    monkeypatch.setattr(Path, "read_bytes", lambda p: opened.append(p.resolve()) or read_bytes(p))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    rows = table_rows(df, image_col="image", caption_col="caption", label_col="label")
    summary = build(images, rows, tmp_path / "out", labels=True)  # one process, so the patches see all

    assert outside.resolve() not in opened and Path("/etc/passwd") not in opened
    assert not any(w * h > 10**6 for w, h in decoded), "bombs must be rejected before decoding"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert (summary.num_written, summary.num_rejected) == (1, len(cases) - 1)
    assert summary.num_written + summary.num_rejected == summary.num_rows == len(cases)
    assert list(read_samples(tmp_path / "out")) == ["000000000"]
    rejected = {int(r["index"]): r for r in rejected_rows(tmp_path / "out")}
    for index, expected in enumerate(cases.values()):
        if expected is None:
            assert index not in rejected
        else:
            assert expected in rejected[index]["reason"], (list(cases)[index], rejected[index]["reason"])
    assert rejected[1]["image"] == "truncated.jpg" and rejected[1]["caption"] == "x"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["num_written"], manifest["num_rejected"]) == (1, len(cases) - 1)


def test_all_rejected_still_writes_metadata(tmp_path):
    summary = build(tmp_path, [Row(0, "nope.jpg", "x")], tmp_path / "out")
    assert (summary.num_written, summary.num_rejected) == (0, 1)
    assert [(s.name, s.num_samples) for s in summary.shards] == [("shard-000000.tar", 0)]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"shard-000000.tar": 0}
    assert len(rejected_rows(tmp_path / "out")) == 1


def test_rejected_csv_is_written_with_header_when_empty(images, tmp_path):
    build(images, [Row(0, "red.jpg", "x")], tmp_path / "out")
    assert (tmp_path / "out" / "rejected.csv").read_text().splitlines() == ["index,image,caption,reason"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), (np.int64(4), 4), (5.0, 5), ("6", 6), (" 7 ", 7), (True, None), ("x", None)],
)
def test_parse_label(value, expected):
    if expected is None:
        with pytest.raises(Rejected):
            parse_label(value)
    else:
        assert parse_label(value) == expected
    with pytest.raises(Rejected, match="out of range"):
        parse_label(10, num_classes=10)


# ---- determinism ----------------------------------------------------------------------------------


def test_shards_are_byte_identical_across_runs_and_workers(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(40):
        (root / f"{i}.png").write_bytes(image_bytes(noise((20 + i, 30), seed=i), "PNG"))
    captions = [f"picture {i}" if i % 9 else "" for i in range(42)]  # a few rejects mixed in
    df = pd.DataFrame({"image": [f"{i}.png" for i in range(42)], "caption": captions})
    rows = table_rows(df, image_col="image", caption_col="caption")

    outputs = []
    for run, num_workers in enumerate([1, 2, 1]):
        out = tmp_path / f"out{run}"
        build(root, rows, out, shard_size=7, num_workers=num_workers)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"})
    assert len([n for n in outputs[0] if n.endswith(".tar")]) == 6  # 42 rows / 7, rejects left out
    sizes = [6, 6, 6, 6, 7, 4]  # rows 0, 9, 18, 27, 36 lack a caption; 40.png and 41.png do not exist
    assert json.loads(outputs[0]["sizes.json"]) == {f"shard-{i:06d}.tar": n for i, n in enumerate(sizes)}
    assert outputs[0] == outputs[1] == outputs[2]


def test_refuses_to_mix_with_shards_of_another_job(images, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000000.tar").write_bytes(bytes(10240))  # no job.json: not ours to resume
    with pytest.raises(ValueError, match="already holds shards"):
        build(images, [Row(0, "red.jpg", "x")], tmp_path / "out")


# ---- CLIs -----------------------------------------------------------------------------------------


def test_make_shards_cli(images, tmp_path):
    df = pd.DataFrame({"path": ["red.jpg", "gone.jpg"], "text": ["red", "lost"], "y": [1, 2]})
    table = write_table(df, tmp_path / "c.csv")
    out = tmp_path / "out"
    result = run_cli(
        "make_shards.py", "--images", images, "--captions", table, "--out", out, "--image-col", "path",
        "--caption-col", "text", "--label-col", "y", "--prefix", "cc", "--workers", "2", "--image-size", "20",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 rows = 1 written" in result.stdout and "1 rejected" in result.stdout
    assert json.loads((out / "sizes.json").read_text()) == {"cc-000000.tar": 1}
    assert json.loads((out / "manifest.json").read_text())["args"]["label_col"] == "y"
    assert int(read_samples(out)["000000000"]["cls"]) == 1


@pytest.mark.parametrize(
    ("table_name", "content", "extra_args", "message"),
    [
        ("c.csv", "image,text\nred.jpg,hi\n", [], "'caption' not found"),
        (
            "c.csv",
            "image,caption\nred.jpg,hi\n",
            ["--label-col", "y"],
            "available columns: 'image', 'caption'",
        ),
        ("c.xlsx", "whatever", [], "extension"),
        ("c.parquet", "not parquet at all", [], "cannot read"),
        ("absent.csv", None, [], "does not exist"),
    ],
)
def test_make_shards_cli_errors_are_clean(images, tmp_path, table_name, content, extra_args, message):
    table = tmp_path / table_name
    if content is not None:
        table.write_text(content)
    result = run_cli(
        "make_shards.py", "--images", images, "--captions", table, "--out", tmp_path / "o", *extra_args
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "o" / "job.json").exists(), "a refused input must not pin the output's settings"


# ---- eval sets --------------------------------------------------------------------------------------


def test_eval_set_cli_writes_clip_benchmark_layout(images, tmp_path):
    df = pd.DataFrame({"image": ["red.jpg", "sub/noise.png", "gray.webp", "red.jpg"], "label": [2, 0, 1, 5]})
    table = write_table(df, tmp_path / "labels.jsonl")
    (tmp_path / "classes.txt").write_text("cat\ndog\nred thing\n\n")
    out = tmp_path / "eval"
    result = run_cli(
        "make_eval_set.py", "--images", images, "--labels", table, "--classnames", tmp_path / "classes.txt",
        "--out", out, "--shard-size", "2", "--image-size", "16", "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    assert (out / "classnames.txt").read_text().splitlines() == ["cat", "dog", "red thing"]
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    assert (out / "dataset_type.txt").read_text().strip() == "classification"
    assert (out / "test" / "nshards.txt").read_text().strip() == "2"
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar"]
    assert json.loads((out / "test" / "sizes.json").read_text()) == {"0.tar": 2, "1.tar": 1}
    assert json.loads((out / "test" / "manifest.json").read_text())["num_rejected"] == 1
    assert "out of range" in rejected_rows(out / "test")[0]["reason"]  # label 5 of 3 classes

    # Read it the way CLIP_benchmark does: "{0..n-1}.tar", images + cls only.
    dataset = wds.WebDataset(str(out / "test" / "{0..1}.tar"), shardshuffle=False)
    samples = list(dataset)
    assert [set(s) - {"__key__", "__url__", "__local_path__"} for s in samples] == [{"jpg", "cls"}] * 3
    assert [int(s["cls"]) for s in samples] == [2, 0, 1]


def test_eval_set_custom_templates_and_errors(images, tmp_path):
    rows = [Row(0, "red.jpg", label=0)]
    write_eval_set(rows, tmp_path / "ok", ["thing"], ["itap of a {c}."], images_dir=images, image_size=8)
    assert (tmp_path / "ok" / "zeroshot_classification_templates.txt").read_text() == "itap of a {c}.\n"
    with pytest.raises(ValueError, match="must be one line containing"):
        write_eval_set(rows, tmp_path / "bad", ["thing"], ["a photo."], images_dir=images)
    with pytest.raises(ValueError, match="placeholder"):
        write_eval_set(rows, tmp_path / "bad", ["thing"], ["a {c} of {x}."], images_dir=images)

    (tmp_path / "t.txt").write_text("a photo without the placeholder\n")
    (tmp_path / "c.txt").write_text("thing\n")
    (tmp_path / "l.csv").write_text("image,label\nred.jpg,0\n")
    result = run_cli(
        "make_eval_set.py", "--images", images, "--labels", tmp_path / "l.csv", "--classnames", tmp_path / "c.txt",
        "--templates", tmp_path / "t.txt", "--out", tmp_path / "cli",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "{c}" in result.stderr
