"""Helpers shared by the tests (fixtures that are plain functions)."""
