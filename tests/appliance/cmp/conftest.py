"""Fixtures shared by the CMP tests (tests/appliance/cmp/upstream_support.py): `local`, this appliance, and
`upstream`, a second Birthline instance acting as the upstream CA."""

from tests.appliance.cmp.upstream_support import local_fixture, upstream_fixture  # noqa: F401 - fixtures
