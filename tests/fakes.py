"""Shared by tests: faking what the machine reports, and the stress switch."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from kvloom.models.dtype_choice import CpuMatmulSupport

STRESS = os.environ.get("KVLOOM_STRESS") == "1"
"""``KVLOOM_STRESS=1`` (what ``nox -s stress`` sets): the reliability tests run their long versions."""


def fake_cpu(monkeypatch: pytest.MonkeyPatch, cpu: CpuMatmulSupport) -> None:
    """Make ``CpuMatmulSupport.probe()`` report ``cpu`` (so ``dtype="auto"`` decides as on that CPU)."""
    monkeypatch.setattr(CpuMatmulSupport, "probe", classmethod(lambda cls: cpu))


def state_machine_settings(ci_examples: int, stress_examples: int) -> settings:
    """Hypothesis settings of a stateful test: ``ci_examples`` runs of up to 40 steps in CI,
    ``stress_examples`` of up to 60 under ``KVLOOM_STRESS=1``; no deadline (CI machines are shared)."""
    return settings(
        max_examples=stress_examples if STRESS else ci_examples,
        stateful_step_count=60 if STRESS else 40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
