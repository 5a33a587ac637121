"""Optimization passes: each reads a finished run and writes a new run directory."""
