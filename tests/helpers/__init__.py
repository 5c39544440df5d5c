"""Helpers shared by the test files: photos, label configs, processes, waiting."""
