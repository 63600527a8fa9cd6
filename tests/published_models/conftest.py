"""The published models' tests share one export and one run per model and process, and count themselves.

Each model's tests sit in one xdist group (``make test`` runs ``--dist loadgroup``), so one worker
exports it into the cache (if it is not there already) and runs it once. A missing wheel fails the
test with the line that says to run ``make setup``; it never skips.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from published_models import PublishedModelsError, load
from published_models.model import PublishedModel


def _published(name: str) -> PublishedModel:
    try:
        return load(name)
    except PublishedModelsError as error:
        pytest.fail(str(error), pytrace=False)


@functools.cache
def _saved_model_outputs(name: str) -> dict[str, np.ndarray]:
    from published_models.peers import run_saved_model

    return run_saved_model(_published(name))


@pytest.fixture(scope="session")
def published():
    """``published(name)``: the published model, or the test fails with the reason (e.g. run ``make setup``)."""
    return _published


@pytest.fixture(scope="session")
def saved_model_outputs():
    """``saved_model_outputs(name)``: our SavedModel's outputs on the sample inputs, run once per process."""
    return _saved_model_outputs


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say how many tests on real published models ran (the issue asks for the count)."""
    ran = [
        report
        for kind in ("passed", "failed", "error")
        for report in terminalreporter.stats.get(kind, [])
        if getattr(report, "when", "call") == "call" and "real" in getattr(report, "keywords", {})
    ]
    if ran:
        failed = sum(report.failed for report in ran)
        terminalreporter.write_line(f"published models: {len(ran)} real-model tests ran, {failed} failed")
