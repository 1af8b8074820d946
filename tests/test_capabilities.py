"""Under CI=true a missing capability fails the tests that need it; locally they are skipped with a reason.
Under CI=true Hypothesis draws the same examples on every run, and a failure prints how to replay it."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]

INNER_CONFTEST = "from tests.capabilities import pytest_configure, pytest_runtest_setup  # noqa: F401\n"
INNER_TESTS = """
import pytest
from tests.capabilities import missing, needs


@needs(False, "Fashion-MNIST", "apt-get install dataset-fashion-mnist")
def test_marked():
    pass


@pytest.fixture
def cluster():
    missing("SLURM", "slurmctld not found")


def test_fixture(cluster):
    pass


@needs(True, "emoji", "apt-get install fonts-noto-color-emoji")
def test_present():
    pass
"""


@pytest.mark.parametrize("ci", ["true", "", None])
def test_missing_capability_fails_in_ci_and_skips_locally(pytester, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-ra", "-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(passed=1, errors=2)  # errors at set-up fail the run
        assert result.ret != 0
        result.stdout.fnmatch_lines(
            [
                "*CI=true, so every capability must be tested: Fashion-MNIST is not available*",
                "*CI=true, so every capability must be tested: SLURM is not available*",
            ]
        )
    else:
        result.assert_outcomes(passed=1, skipped=2)
        # -ra lists each skip with its reason in the summary.
        result.stdout.fnmatch_lines(
            ["SKIPPED*Fashion-MNIST is not available: apt-get install*", "SKIPPED*SLURM is not available*"]
        )


INNER_HYPOTHESIS = """
from hypothesis import given, settings, strategies as st


@settings(max_examples=200)
@given(st.integers())
def test_draws(x):
    with open("drawn.txt", "a") as f:
        f.write(f"{x}\\n")
    assert x < 1000
"""


def test_hypothesis_is_derandomized_in_ci_and_prints_its_failure_blob(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    # A subprocess: the profile is loaded once per process, when conftest imports tests.capabilities.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_HYPOTHESIS)
    runs = []
    for _ in range(2):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*@reproduce_failure(*"])  # what replays the failure, printed
        runs.append((pytester.path / "drawn.txt").read_text().split())
        (pytester.path / "drawn.txt").unlink()
    assert runs[0] == runs[1] and len(set(runs[0])) > 10  # the same examples, in the same order


NOT_FOR_CI_TESTS = """
from tests.capabilities import missing, needs


@needs(False, "a CUDA device", "a lent GPU machine", expected_in_ci=False)
def test_marked():
    pass


def test_called():
    missing("img2dataset", "pip install img2dataset in its own venv", expected_in_ci=False)
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_capability_ci_is_not_set_up_with_skips_with_its_reason_even_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=NOT_FOR_CI_TESTS)
    result = pytester.runpytest("-ra", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["SKIPPED*a CUDA device is not available: a lent GPU*", "SKIPPED*img2dataset is not available: pip*"]
    )
