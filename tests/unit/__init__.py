"""Unit tests (a package so that its conftest is imported as ``unit.conftest`` and does not
shadow ``tests/reference/conftest.py``, which the reference tests import as ``conftest``)."""
