"""Commands a reader copies run anywhere: the docs and the benchmarks name no absolute folder of the machine
where a figure was measured (a venv under /work, a lock file under /tmp, a home folder). They use a
variable, PATH, a relative folder or the system temp dir instead."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

# A path that starts at one of these folders (not inside a URL, a variable's default or a longer path).
MACHINE_PATH = re.compile(r"(?<![\w.~}/$-])/(?:work|root|home|Users|scratch|mnt|tmp)/[^\s`'\")\]]*")


def documentation_and_benchmarks() -> list:
    bench = [p for p in (REPO / "bench").rglob("*") if p.suffix in {".py", ".sh", ".md"}]
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(bench)]


@pytest.mark.parametrize(
    "text, found",
    [
        (
            'IMG2DATASET = os.environ.get("IMG2DATASET", "/work/bench-venvs/img2dataset/bin/img2dataset")',
            True,
        ),
        ("`flock /tmp/clip-pipe-bench.lock python -m bench.prep`", True),
        ("python -m venv /tmp/infinity && /tmp/infinity/bin/pip install infinity-emb", True),
        ("--out=/home/alice/shards", True),
        ("OUT=${OUT:-${TMPDIR:-/tmp}/clip-pipe-gpu}", False),
        ("IMG2DATASET=img2dataset-venv/bin/img2dataset", False),
        ("/usr/share/datasets/fashion-mnist/ and /proc/self/status", False),
        ("http://127.0.0.1:8080/tmp/x.jpg and data/work/shards", False),
    ],
)
def test_the_pattern_finds_machine_folders_only(text, found):
    assert bool(MACHINE_PATH.search(text)) is found


def test_no_machine_paths_in_docs_or_benchmarks():
    files = documentation_and_benchmarks()
    assert (
        len(files) > 10 and REPO / "docs" / "benchmarks.md" in files and REPO / "bench" / "prep.py" in files
    )
    found = [
        f"{path.relative_to(REPO)}:{number}: {match.group()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in MACHINE_PATH.finditer(line)
    ]
    assert not found, "one machine's folders; use a variable, PATH or the temp dir:\n" + "\n".join(found)
