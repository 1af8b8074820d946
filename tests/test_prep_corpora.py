"""Real-caption corpora: a folder with sidecar captions (Tux Paint's layout) and the emoji set."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from clip_pipe.prep import EncodeConfig
from clip_pipe.prep.dataset import build_dataset
from clip_pipe.prep.emoji import DEFAULT_EMOJI_TEST, DEFAULT_FONT, emoji_rows, read_emoji_test
from clip_pipe.prep.folders import sidecar_rows
from clip_pipe.prep.verify import verify_dataset
from tests.capabilities import needs
from tests.prep_helpers import image_bytes

REPO = Path(__file__).resolve().parents[1]
TUXPAINT = Path("/usr/share/tuxpaint/stamps")

SVG = b"""<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="#0000ff"/></svg>"""
# An external entity: rendering must not read the file it names.
XXE = b"""<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&x;</text></svg>"""


def test_sidecar_folder(tmp_path):
    root = tmp_path / "stamps"
    (root / "animals").mkdir(parents=True)
    (root / "animals" / "frog.png").write_bytes(image_bytes(Image.new("RGBA", (30, 30), (0, 200, 0, 0))))
    (root / "animals" / "frog.txt").write_text("\n  A green frog.\nde.utf8=Ein Frosch.\n", encoding="utf-8")
    (root / "animals" / "frog_mirror.png").write_bytes(image_bytes(Image.new("RGB", (30, 30))))  # no sidecar
    (root / "shape.svg").write_bytes(SVG)
    (root / "shape.txt").write_text("A blue bar.")
    (root / "evil.svg").write_bytes(XXE)
    (root / "evil.txt").write_text("Nothing to see.")
    (root / "latin.png").write_bytes(image_bytes(Image.new("RGB", (30, 30), "red")))
    (root / "latin.txt").write_bytes(b"A caf\xe9.")
    (root / "notes.ogg").write_bytes(b"sound, not an image")

    rows = sidecar_rows(root)
    assert [r.image for r in rows] == [
        "animals/frog.png", "animals/frog_mirror.png", "evil.svg", "latin.png", "shape.svg",
    ]  # fmt: skip
    summary = build_dataset(rows, tmp_path / "out", EncodeConfig(images_dir=root, image_size=16))
    assert (summary.num_written, summary.num_rejected) == (2, 3)
    got = {
        json.loads(s["json"])["source"]: s
        for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)
    }
    assert got["animals/frog.png"]["txt"] == b"A green frog."
    frog = Image.open(io.BytesIO(got["animals/frog.png"]["jpg"])).convert("RGB")
    assert min(frog.getpixel((8, 8))) > 245, "transparent stamp pixels come out white"
    bar = Image.open(io.BytesIO(got["shape.svg"]["jpg"])).convert("RGB")
    assert bar.size == (32, 16) and bar.getpixel((16, 8))[2] > 200  # rendered at the target size, blue
    assert summary.reasons == {
        "caption is missing": 1,
        "caption is not valid UTF-8": 1,
        next(r for r in summary.reasons if "EntitiesForbidden" in r): 1,
    }


needs_tuxpaint = needs(
    (TUXPAINT / "animals" / "insects").is_dir(), "Tux Paint stamps", "apt-get install tuxpaint-stamps-default"
)
needs_emoji = needs(
    DEFAULT_FONT.is_file() and DEFAULT_EMOJI_TEST.is_file(),
    "emoji font and names",
    "apt-get install fonts-noto-color-emoji unicode-data",
)


def run_cli(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "data_prep" / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@needs_tuxpaint
def test_tuxpaint_stamps_real_captions(tmp_path):
    # One category keeps the test short: photos (PNG with alpha) and drawings (SVG), real sentences.
    root = TUXPAINT / "animals" / "insects"
    proc = run_cli(
        "tuxpaint.py", "--root", root, "--out", tmp_path / "out", "--image-size", "32", "--workers", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_dataset(tmp_path / "out").problems == []
    samples = list(
        wds.WebDataset(
            sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False, empty_check=False
        )
    )
    sources = {json.loads(s["json"])["source"]: s["txt"].decode() for s in samples}
    assert {"bee.png", "cartoon/ant.svg"} <= sources.keys()
    # bee.svg declares XML entities; cairosvg's safe parser refuses any, and the row says so.
    assert "EntitiesForbidden" in (tmp_path / "out" / "rejected.csv").read_text()
    assert sources["bee.png"] == (root / "bee.txt").read_text().splitlines()[0].strip()
    assert all(c[:1].isupper() for c in sources.values()), "English sentences"


@needs_emoji
def test_emoji_names_and_renders(tmp_path):
    emoji = read_emoji_test()
    assert len(emoji) > 1500 and emoji[0].name == "grinning face"
    assert not any("skin tone" in e.name for e in emoji)
    _, num_rows = emoji_rows(limit=30)
    assert num_rows == 30
    proc = run_cli(
        "emoji.py", "--out", tmp_path / "out", "--limit", "30", "--image-size", "32", "--workers", "1"
    )
    assert proc.returncode == 0, proc.stderr
    assert "30 rows = 30 written" in proc.stdout
    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)))
    assert sample["txt"] == b"grinning face"
    face = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    r, g, b = face.getpixel((face.width // 2, face.height // 4))
    assert r > 200 and g > 150 and b < 120, "a yellow face, drawn in colour"
