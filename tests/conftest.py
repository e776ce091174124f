"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

SYNTH = {"n": 6, "shape": (32, 48, 48), "seed": 0, "scrolls": 3, "n_test": 2}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the competition layout: 6 training volumes of 32x48x48 over 3
    scrolls and 2 test volumes. Shared by the whole session: copy it before changing anything."""
    from vesuvius_lab.core.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth") / "data", progress=False, **SYNTH)
