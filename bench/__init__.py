"""Benchmarks, run as scripts (python bench/NAME.py); a package only so mypy names bench/stations.py apart from the stations package."""
