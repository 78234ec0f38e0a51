"""Fixtures shared by the CMP tests: the second Birthline instance acting as upstream CA (test_forwarder.py)."""

from tests.appliance.cmp.test_forwarder import upstream  # noqa: F401 - re-exported as a fixture
