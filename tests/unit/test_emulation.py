"""Emulated accelerators (mpisgd/emulation.py): which ranks sleep how long per training step, and that
only training forward passes are padded (the sleep itself is replaced by a recorder: no clock)."""

import pytest
import torch

from mpisgd import emulation
from mpisgd.errors import ConfigError
from mpisgd.models import build_model


def test_slow_factors_parse_and_reject_bad_specs():
    assert emulation.slow_factors("3:4, 5:2.5") == {3: 4.0, 5: 2.5}
    for bad in ("3", "a:4", "3:0"):
        with pytest.raises(ConfigError, match="MPISGD_EMULATED_SLOW_RANKS"):
            emulation.slow_factors(bad)


def test_step_seconds_per_rank(monkeypatch):
    monkeypatch.setenv("MPISGD_EMULATED_STEP_SECONDS", "0.02")
    monkeypatch.setenv("MPISGD_EMULATED_SLOW_RANKS", "3:4")
    assert emulation.emulated_step_seconds(3) == pytest.approx(0.08)
    assert emulation.emulated_step_seconds(1) == pytest.approx(0.02)
    monkeypatch.setenv("MPISGD_EMULATED_STEP_SECONDS", "-1")
    with pytest.raises(ConfigError, match="MPISGD_EMULATED_STEP_SECONDS"):
        emulation.emulated_step_seconds(0)


def test_only_training_forward_passes_are_padded(monkeypatch):
    slept = []
    monkeypatch.setattr(emulation.time, "sleep", slept.append)
    monkeypatch.setenv("MPISGD_EMULATED_STEP_SECONDS", "0.5")
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("MPISGD_EMULATED_SLOW_RANKS", "2:3")
    model = build_model("mlp", (6,), 3, (8,), seed=0)
    model(torch.zeros(4, 6))
    model.eval()
    model(torch.zeros(4, 6))
    assert slept == [pytest.approx(1.5)]


def test_nothing_is_attached_without_the_variable(monkeypatch):
    monkeypatch.delenv("MPISGD_EMULATED_STEP_SECONDS", raising=False)
    slept = []
    monkeypatch.setattr(emulation.time, "sleep", slept.append)
    build_model("linear", (6,), 3, seed=0)(torch.zeros(1, 6))
    assert slept == []
