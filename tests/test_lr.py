"""The learning-rate schedule is a pure function of the step."""

from __future__ import annotations

import itertools

import pytest

from clip_pipe.config import OptimConfig
from clip_pipe.train import lr_at


def test_linear_warmup_then_cosine_to_min_lr():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(10, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    values = [lr_at(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_constant_schedule_and_no_warmup():
    optim = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, optim, 50) for s in range(50)} == {0.5}


def test_warmup_longer_than_the_run_still_works():
    optim = OptimConfig(lr=1.0, warmup_steps=100)
    assert lr_at(4, optim, 5) == pytest.approx(0.05)


def test_unmasked_tune_restarts_at_tune_lr_and_the_main_schedule_ends_before_it():
    optim = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, tune_steps=20, tune_lr=0.05)
    # The main cosine runs over the first 100 of 120 steps and reaches min_lr where the tune begins.
    assert lr_at(55, optim, 120) == pytest.approx(0.5)
    assert lr_at(99, optim, 120) < 1e-3
    assert lr_at(100, optim, 120) == pytest.approx(0.05)  # the tune's own peak, then its own cosine
    assert lr_at(110, optim, 120) == pytest.approx(0.025)
    values = [lr_at(s, optim, 120) for s in range(100, 120)]
    assert all(a > b for a, b in itertools.pairwise(values))
    # Default: a hundredth of the peak, as FLIP's unmasked tune.
    assert lr_at(45, OptimConfig(lr=1.0, warmup_steps=0, tune_steps=5), 50) == pytest.approx(0.01)
    # No tune: the schedule is the one it always was.
    plain = OptimConfig(lr=1.0, warmup_steps=10)
    assert [lr_at(s, plain, 120) for s in range(121)] == [
        lr_at(s, OptimConfig(lr=1.0, warmup_steps=10, tune_steps=0), 120) for s in range(121)
    ]
