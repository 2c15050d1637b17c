"""Shared fixtures: the linear-Gaussian test bed and the small case of geoinvert.testing."""

import pytest

from geoinvert.testing import linear_gaussian, small_case


@pytest.fixture(scope="module")
def problem():
    """``(prior, posteriors, exact)`` of the 8x8 linear-Gaussian test bed (test files with a
    problem of their own override it)."""
    return linear_gaussian()


@pytest.fixture
def small():
    """A fresh copy of the small case dictionary."""
    return small_case()
