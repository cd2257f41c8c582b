"""Hostile input for every path into ImageBridge: generators of malformed and oversized input
(hypothesis strategies), the checks each answer must pass, and the figures of a run.

The property tests (tests/test_hostile_*.py) run them with a small budget under pytest; the
fuzz harness (``python tests/fuzz/run.py``) runs the same tests with a larger one and prints
how many cases each input path took and how many failed.
"""
