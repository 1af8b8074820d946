"""Eval sets of each kind read as they are, scored with a real (tiny) model in one process; the CLI in
both CLIP_benchmark directions; the report rendered in a real headless browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from clip_pipe.cli import main
from clip_pipe.eval import embed, read_eval_set, score
from clip_pipe.eval.figures import figure_data
from clip_pipe.eval.report import write_report
from clip_pipe.model import load_export
from tests.capabilities import missing
from tests.conftest import write_eval_set
from tests.eval_helpers import (
    write_clip_benchmark_classification,
    write_clip_benchmark_retrieval,
    write_pairs_set,
)


@pytest.fixture
def sets(tmp_path) -> dict[str, Path]:
    return {
        "pairs": write_pairs_set(tmp_path / "pairs", bad_keys=(5,)),
        "cb_retrieval": write_clip_benchmark_retrieval(tmp_path / "cb_retrieval"),
        "cb_classes": write_clip_benchmark_classification(tmp_path / "cb_classes"),
    }


@pytest.fixture
def probe_train(tmp_path) -> Path:
    """The linear probe's training set: red, green and blue only, so a probe fitted on it cannot name the
    test sets' yellow squares, and its test score is not its training score (1.0)."""
    return write_pairs_set(tmp_path / "probe_train", num_images=9, seed=7, num_shards=1, num_colors=3)


def test_read_eval_set_detects_each_kind(tmp_path, sets):
    assert read_eval_set(sets["pairs"]).kind == "retrieval"
    assert len(read_eval_set(sets["pairs"]).shard_urls) == 2
    assert read_eval_set(sets["cb_retrieval"]).kind == "retrieval"
    classes = read_eval_set(sets["cb_classes"])
    assert (classes.kind, classes.classnames) == ("classification", ["red", "green", "blue", "yellow"])
    with pytest.raises(ValueError, match="no such folder"):
        read_eval_set(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither sizes\.json"):
        read_eval_set(tmp_path / "empty")
    (sets["cb_classes"] / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(ValueError, match=r"missing zeroshot_classification_templates\.txt"):
        read_eval_set(sets["cb_classes"])


def reference_recall(emb, k: int) -> tuple[float, float]:
    """CLIP_benchmark's definition, written out: a (texts x images) positive-pair matrix; a query is a
    hit when at least one positive is among its top k. Candidates tied with the best positive are
    ordered at random, and each query counts its expected hit (the tie rule in eval/retrieval.py)."""
    images = sorted(set(emb.groups), key=emb.groups.index)
    image_of_text = [images.index(emb.groups[o]) for o in emb.text_owner.tolist()]
    first_rows = [emb.groups.index(g) for g in images]
    scores = (emb.texts @ emb.images[first_rows].T).tolist()
    positive = [[image_of_text[t] == i for i in range(len(images))] for t in range(len(scores))]

    def expected_hit(s: list[float], p: list[bool]) -> float:
        best = max(x for x, is_pos in zip(s, p, strict=True) if is_pos)
        above = sum(x > best for x in s)
        tied_pos = sum(x == best and is_pos for x, is_pos in zip(s, p, strict=True))
        tied_neg = sum(x == best and not is_pos for x, is_pos in zip(s, p, strict=True))
        slots = k - above
        if slots <= 0:
            return 0.0
        if slots > tied_neg:  # room for a positive whatever the order
            return 1.0
        return 1 - math.comb(tied_neg, slots) / math.comb(tied_neg + tied_pos, slots)

    def recall(s, p):
        return sum(map(expected_hit, s, p)) / len(s)

    transpose = lambda m: [list(col) for col in zip(*m, strict=True)]  # noqa: E731
    return recall(scores, positive), recall(transpose(scores), transpose(positive))


def test_each_kind_scored_with_a_real_model(color_model, sets, probe_train):
    encoder = load_export(color_model)

    def embed_set(path):
        return embed(encoder.model, encoder.preprocess_val, encoder.tokenizer, read_eval_set(path), 5)

    pairs = embed_set(sets["pairs"])
    # 12 images x 2 captions, one sample unreadable: 23 samples, 12 distinct images, 23 captions.
    assert (len(pairs.keys), pairs.num_skipped, len(set(pairs.groups)), len(pairs.captions)) == (
        23,
        1,
        12,
        23,
    )
    assert pairs.labels is not None and pairs.class_texts is None
    r = score(pairs, probe_train=embed_set(probe_train))
    assert (r["num_images"], r["num_texts"], r["num_skipped"]) == (12, 23, 1)
    for k in (1, 5, 10):
        t2i, i2t = reference_recall(pairs, k)
        assert r[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert r[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    # Colours are linearly separable: the probe names every red, green and blue square, and none of the
    # 6 yellow ones (images 3, 7 and 11, two captions each), a class it never saw.
    assert r["linear_probe_train_samples"] == 18
    assert r["linear_probe_top1"] == r["linear_probe_top5"] == pytest.approx(17 / 23)
    assert r["linear_probe_mean_per_class_recall"] == pytest.approx(3 / 4)
    assert r["kmeans_nmi"] > 0.9  # and cluster by colour

    cb = embed_set(sets["cb_retrieval"])
    assert len(cb.keys) == 9 and len(cb.captions) == 3 * (1 + 2 + 3)  # every line of each txt is a caption
    assert cb.labels is None and cb.text_owner.tolist() == sorted(cb.text_owner.tolist())
    results = score(cb)
    assert results["text_retrieval_recall@10"] == 1.0  # 9 images, each with its captions among 18 texts
    classes = score(embed_set(sets["cb_classes"]))
    assert classes["top1"] == 1.0 and classes["kmeans_ari"] > 0.9


def test_cli_eval_reads_clip_benchmark_sets_and_writes_its_results(
    color_model, sets, probe_train, tmp_path, capsys
):
    out = tmp_path / "cb_{dataset}_{task}.json"
    argv = ["eval", "--checkpoint", str(color_model), "--format", "clip_benchmark", "--out", str(out),
            "--linear-probe-train", str(probe_train), "--model-name", "clip-pipe-test"]  # fmt: skip
    for path in [*sets.values(), probe_train]:
        argv += ["--eval-set", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "cb_classes: top-1 100.00%" in printed and "text->image R@1" in printed
    written = sorted(p.name for p in tmp_path.glob("cb_*.json"))
    assert written == [  # no linear probe on `probe_train`: it is the probe's own training set
        "cb_cb_classes_linear_probe.json", "cb_cb_classes_zeroshot_classification.json",
        "cb_cb_retrieval_zeroshot_retrieval.json", "cb_pairs_linear_probe.json",
        "cb_pairs_zeroshot_retrieval.json", "cb_probe_train_zeroshot_retrieval.json",
    ]  # fmt: skip
    # CLIP_benchmark's result file: these keys, as its `clip_benchmark eval` dumps them.
    record = json.loads((tmp_path / "cb_cb_classes_zeroshot_classification.json").read_text())
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert (record["dataset"], record["model"], record["pretrained"]) == (
        "cb_classes",
        "clip-pipe-test",
        str(color_model),
    )
    assert record["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    retrieval = json.loads((tmp_path / "cb_pairs_zeroshot_retrieval.json").read_text())["metrics"]
    assert set(retrieval) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    # The probe knows red, green and blue, not yellow: cb_classes has 4 yellow squares of 16, pairs 6 of
    # 23 samples (one unreadable), and a yellow square is among none of its (3) guesses.
    probe = json.loads((tmp_path / "cb_cb_classes_linear_probe.json").read_text())["metrics"]
    assert probe == {"lp_acc1": 0.75, "lp_acc5": 0.75, "lp_mean_per_class_recall": 0.75}
    probe = json.loads((tmp_path / "cb_pairs_linear_probe.json").read_text())["metrics"]
    assert probe == {"lp_acc1": pytest.approx(17 / 23), "lp_acc5": pytest.approx(17 / 23),
                     "lp_mean_per_class_recall": 0.75}  # fmt: skip

    # One file for several results is refused before any work, in one line.
    argv[argv.index(str(out))] = str(tmp_path / "one.json")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --out")


def test_cli_eval_refuses_an_unknown_layout(color_model, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["eval", "--checkpoint", str(color_model), "--eval-set", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither sizes.json" in err


# --- The report, in a real browser ---

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const tables = [...document.querySelectorAll("table")];
  document.body.dataset.numImages = images.length;
  document.body.dataset.broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.emptyTables = tables.filter(t => t.querySelectorAll("td").length === 0).length;
  document.body.dataset.numTables = tables.length;
});
</script></body>"""

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
]  # fmt: skip


def render(page: Path, out_dir: Path) -> dict:
    """Open `page` in headless Chromium: the numbers of images, broken images and empty tables, plus a
    screenshot. The checks run in a copy of the page, so the report itself carries no test script."""
    chromium = shutil.which("chromium")
    if chromium is None:  # a failure under CI=true, which installs it; a skip elsewhere
        missing("Chromium", "apt-get install chromium (scripts/setup.sh installs it)")
    probe, screenshot = out_dir / "probe.html", out_dir / f"{page.stem}.png"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT))
    with tempfile.TemporaryDirectory() as profile:
        flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run(
            [*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180
        )
        shot = subprocess.run(
            [*flags, f"--screenshot={screenshot}", "--window-size=1200,4000", page.as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    numbers = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body))
    assert screenshot.stat().st_size > 10_000
    return {k: int(v) for k, v in numbers.items()}


def make_run_dir(run_dir: Path, color_model: Path, tmp_path: Path) -> None:
    """A run directory as training leaves it: eval.json, report/figures.json, metrics.jsonl."""
    encoder = load_export(color_model)
    results, figures = {}, {}
    for path in (write_eval_set(tmp_path / "colors"), write_pairs_set(tmp_path / "pairs")):
        eval_set = read_eval_set(path)
        emb = embed(encoder.model, encoder.preprocess_val, encoder.tokenizer, eval_set, 8)
        results[eval_set.name] = score(emb)
        figures[eval_set.name] = figure_data(emb, eval_set)
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps(results))
    (run_dir / "report" / "figures.json").write_text(json.dumps(figures))
    records = [
        {"step": step, "eval_set": name, "alignment": 1.5 - step / 100, "uniformity_image": -step / 50,
         "uniformity_text": -step / 60}
        for step in (10, 20, 30) for name in results
    ]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_is_self_contained_and_renders_without_broken_images(color_model, tmp_path):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, color_model, tmp_path)
    page = write_report(run_dir)
    html = page.read_text()
    # Self-contained: every picture inline, nothing fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:)', html)
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == sorted([
        "alignment_uniformity.png", "colors_confusion.png", "colors_per_class.png", "colors_map.png",
        "colors_similarity.png", "pairs_map.png", "pairs_similarity.png", "pairs_retrieval.png",
    ])  # fmt: skip
    rendered = render(page, tmp_path)
    assert rendered == {"num-images": len(pngs), "broken": 0, "empty-tables": 0, "num-tables": 2}

    # The same check catches a broken picture and an empty table.
    (run_dir / "broken.html").write_text(
        html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1).replace(
            "<table", "<table><tr><th>x</th></tr></table><table", 1
        )
    )
    rendered = render(run_dir / "broken.html", tmp_path)
    assert (rendered["broken"], rendered["empty-tables"]) == (1, 1)


def test_clip_pipe_report_redraws_from_the_json_alone(color_model, tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_run_dir(run_dir, color_model, tmp_path)
    (run_dir / "eval.json").rename(run_dir / "zeroshot.json")  # a run from before eval.json
    results = json.loads((run_dir / "zeroshot.json").read_text())
    (run_dir / "zeroshot.json").write_text(json.dumps({"colors": results["colors"]}))
    assert main(["report", str(run_dir)]) == 0
    assert "report/index.html" in capsys.readouterr().out
    assert "colors_confusion.png" in {p.name for p in (run_dir / "report").glob("*.png")}
    assert main(["report", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow  # three make_shards.py runs
def test_make_shards_group_col_makes_one_image_with_several_captions(color_model, tmp_path):
    import random
    import sys

    from tests.conftest import REPO, color_jpeg

    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    rows = ["image,caption,image_id"]
    for i, color in enumerate(["red", "green", "blue"]):
        (tmp_path / "images" / f"{color}.jpg").write_bytes(color_jpeg(color, rng))
        # The same picture saved twice under two names: one image, by its id, whatever the file.
        (tmp_path / "images" / f"{color}_copy.jpg").write_bytes(color_jpeg(color, rng))
        rows += [f"{color}.jpg,a {color} square,id{i}", f"{color}_copy.jpg,something {color},id{i}"]
    rows += ["red.jpg,the same red file again,id9"]  # without --group-col, grouped with row 0 by its bytes
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")

    def shard(out: str, *extra: str) -> Path:
        proc = subprocess.run(
            [sys.executable, "data_prep/make_shards.py", "--images", str(tmp_path / "images"), "--captions",
             str(tmp_path / "captions.csv"), "--out", str(tmp_path / out), "--image-size", "16", "--workers", "1",
             *extra],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return tmp_path / out

    encoder = load_export(color_model)
    for folder, groups in (
        (shard("by_id", "--group-col", "image_id"), ["id0", "id0", "id1", "id1", "id2", "id2", "id9"]),
        (shard("by_bytes"), None),
    ):
        emb = embed(encoder.model, encoder.preprocess_val, encoder.tokenizer, read_eval_set(folder), 4)
        if groups:
            assert emb.groups == groups
            assert score(emb)["num_images"] == 4
        else:  # 7 rows, 6 distinct files: the repeated red.jpg is one image with two captions
            assert emb.groups[0] == emb.groups[6] and len(set(emb.groups)) == 6
            assert score(emb)["num_images"] == 6
    assert main(["eval", "--checkpoint", str(color_model), "--eval-set", str(tmp_path / "by_id")]) == 0
    bad = subprocess.run(
        [sys.executable, "data_prep/make_shards.py", "--images", str(tmp_path / "images"), "--captions",
         str(tmp_path / "captions.csv"), "--out", str(tmp_path / "bad"), "--group-col", "imageid"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "column 'imageid' not found" in bad.stderr


def test_holdout_splits_by_image_and_copies_samples_unchanged(tmp_path):
    import sys

    import webdataset as wds

    from tests.conftest import REPO

    source = write_pairs_set(tmp_path / "pairs", num_images=40, captions_per_image=2)
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    proc = subprocess.run(
        [sys.executable, "data_prep/holdout.py", str(source), "--train", str(train), "--heldout", str(heldout),
         "--fraction", "0.25"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    def samples(folder):
        urls = [{"url": str(folder / name)} for name in json.loads((folder / "sizes.json").read_text())]
        return {s["__key__"]: s for s in wds.tariterators.tarfile_samples(urls)}

    original, kept, held = samples(source), samples(train), samples(heldout)
    assert sorted([*kept, *held]) == sorted(original) and not set(kept) & set(held)
    assert 8 <= len(held) <= 32  # about a quarter of 80
    for key, s in {**kept, **held}.items():
        assert {k: s[k] for k in ("jpg", "txt", "json", "cls")} == {
            k: original[key][k] for k in ("jpg", "txt", "json", "cls")
        }
    # Both captions of an image are on the same side: no held-out image was trained on.
    images = lambda group: {json.loads(s["json"])["sha256"] for s in group.values()}  # noqa: E731
    assert not images(kept) & images(held)
    assert read_eval_set(heldout).kind == "retrieval"


def test_a_truncated_eval_shard_is_counted_not_fatal(tmp_path):
    from clip_pipe.data import SampleErrors
    from clip_pipe.eval.sets import eval_samples

    folder = write_eval_set(tmp_path / "eval", num_samples=40)
    shard = folder / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[41].offset_data + 10  # inside the 21st sample's image
    shard.write_bytes(shard.read_bytes()[:cut])
    errors = SampleErrors()
    samples = list(eval_samples(read_eval_set(folder), 0, 1, errors))
    assert len(samples) == 20  # the samples before the cut are evaluated
    assert [s.index for s in samples] == list(range(len(samples)))
    assert errors.num_skipped == 1  # the cut, reported with its reason
