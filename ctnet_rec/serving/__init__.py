"""Serving: one self-contained inference artifact per checkpoint, and scoring from it."""
