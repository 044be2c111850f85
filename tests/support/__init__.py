"""Shared helpers of the test suite (on sys.path through pyproject's pytest ``pythonpath``)."""
