"""Test helpers, imported as ``tests.helpers.<module>``."""
