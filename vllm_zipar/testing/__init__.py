"""Helpers for tests and benchmarks, outside the runtime path: tiny model files in the real formats."""
