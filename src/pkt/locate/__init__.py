"""Locate: where the task knowledge sits in a teacher (sensitivity, layer selection, block structure)."""
