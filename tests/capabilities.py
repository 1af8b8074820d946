"""Capabilities some tests need (data sets, Debian packages, a SLURM cluster): a skip locally, a failure in CI.

CI installs every one of them (scripts/setup.sh, .ci/run), so under `CI=true` a missing one means a
broken set-up, and the tests that need it must fail rather than pass quietly as skips. Locally a
missing capability is a skip with its reason, which `pytest -ra` prints in the summary.

Under `CI=true` Hypothesis is derandomized too: every run draws the same examples, so a red CI run
fails again wherever it is repeated, and a failure prints the `@reproduce_failure` blob that replays
it. Locally Hypothesis keeps exploring new examples. (Hypothesis 6.131 and later load a built-in
profile like this one wherever `CI` is set; this one holds for every version we allow, and is ours to
read.) conftest.py imports this module before any test module, so the `@settings(...)` of each test
inherit the profile.

A few are not CI's to have (`expected_in_ci=False`): a CUDA device, and the reference tools some benchmarks
compare against from their own venvs (img2dataset, infinity). Without them the test is a skip with its
reason everywhere, CI included.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


settings.register_profile(
    "ci",
    derandomize=True,
    print_blob=True,
    database=None,
    deadline=None,  # a shared CI machine's pauses are not the code's
    suppress_health_check=[HealthCheck.too_slow],
)
if in_ci():
    settings.load_profile("ci")


def missing(what: str, hint: str, expected_in_ci: bool = True) -> NoReturn:
    """Call from a test or fixture that cannot run without `what` (`expected_in_ci`: CI is set up with it)."""
    message = f"{what} is not available: {hint}"
    if expected_in_ci and in_ci():
        pytest.fail(f"CI=true, so every capability must be tested: {message}", pytrace=False)
    pytest.skip(message)


def needs(available: bool, what: str, hint: str, expected_in_ci: bool = True) -> pytest.MarkDecorator:
    """A test marker: the test runs only if `available`; else `missing(what, hint, expected_in_ci)` at set-up."""
    return pytest.mark.needs(available=available, what=what, hint=hint, expected_in_ci=expected_in_ci)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "needs(available, what, hint, expected_in_ci=True): a capability the test needs"
    )


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("needs"):
        if not mark.kwargs["available"]:
            missing(mark.kwargs["what"], mark.kwargs["hint"], mark.kwargs["expected_in_ci"])
