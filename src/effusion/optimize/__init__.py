"""Optimization passes over trained runs; each writes a new run directory and a report."""
