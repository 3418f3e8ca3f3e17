"""Benchmark harness: a suite of methods x scenarios x seeds, run cell by cell, aggregated into a report."""
