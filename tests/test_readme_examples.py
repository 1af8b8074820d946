"""The README's zero-shot, serving and export examples, run as written against a live server, with the
output it shows. (Its TensorBoard example runs in tests/test_tensorboard.py, after a training run.)"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, LiveServer, color_jpeg

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```(\w+)\n(.*?)```", re.S)
OUTPUT = re.compile(r"<!-- output: (\w+) -->\n```text\n(.*?)```", re.S)
NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")
# Examples that use what another example made: run that one first.
NEEDS = {"open_clip": ["export"]}


def readme_examples() -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    text = (REPO / "README.md").read_text()
    examples = {name: (lang, code) for name, lang, code in EXAMPLE.findall(text)}
    return examples, dict(OUTPUT.findall(text))


def make_workdir(folder: Path, model_file: Path) -> Path:
    """What the examples assume: runs/colors/ holds the model; red.jpg and blue.jpg are squares."""
    run = folder / "runs" / "colors"
    run.mkdir(parents=True)
    for name in ("model.safetensors", "open_clip_config.json"):
        shutil.copy(model_file.parent / name, run / name)
    for name, seed in (("red", 1), ("blue", 2)):
        (folder / f"{name}.jpg").write_bytes(color_jpeg(name, random.Random(seed)))
    return folder


def run_example(lang: str, code: str, workdir: Path, port: int) -> subprocess.CompletedProcess:
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    if lang == "python":
        command = [sys.executable, "-c", code]
    else:
        if shutil.which("clip-pipe", path=env["PATH"]) is None:  # not installed: the same module
            code = code.replace("clip-pipe ", f"{sys.executable} -m clip_pipe.cli ")
        command = ["bash", "-c", code]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def split_numbers(text: str) -> tuple[list[str], list[float]]:
    return NUMBER.sub("#", " ".join(text.split())).split("#"), [float(x) for x in NUMBER.findall(text)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, color_model) -> Path:
    return make_workdir(tmp_path_factory.mktemp("readme"), color_model)


@pytest.fixture(scope="module")
def server(workdir):
    with LiveServer(workdir / "runs" / "colors") as live:
        yield live


def check_example(name: str, workdir: Path, port: int = 0) -> None:
    examples, outputs = readme_examples()
    for needed in NEEDS.get(name, []):
        assert run_example(*examples[needed], workdir, port).returncode == 0
    lang, code = examples[name]
    proc = run_example(lang, code, workdir, port)
    assert proc.returncode == 0, proc.stderr
    words, numbers = split_numbers(proc.stdout)
    expected_words, expected_numbers = split_numbers(outputs[name])
    assert words == expected_words, proc.stdout
    # Probabilities to 2 decimals: the same model on another CPU may differ in the last float bits.
    assert numbers == pytest.approx(expected_numbers, abs=0.02), proc.stdout


@pytest.mark.parametrize(
    "name", ["python", "cli", "curl", "httpx", "openai", "metrics", "export", "open_clip"]
)
def test_readme_example_runs_and_prints_what_the_readme_shows(name, workdir, server):
    check_example(name, workdir, server.port)


def test_every_recipe_the_docs_name_exists():
    """A command a reader copies must find its recipe (a rename once left the README's S3 example on a
    file that was gone)."""
    named = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "slurm").iterdir()]:
        named |= set(re.findall(r"configs/([A-Za-z0-9_.-]+\.yaml)", doc.read_text()))
    assert named, "no recipe found in the docs: the pattern is wrong"
    assert sorted(n for n in named if not (REPO / "configs" / n).is_file()) == []
