"""Helpers for tests and benchmarks: random model directories in the families' real formats.

Nothing here is imported when serving; the CLI's `write-random-model` and the benchmarks use it too.
"""
