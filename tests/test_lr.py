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
