"""The demo and the benchmark sweep (`python -m mechanic_fast demo|bench`): not needed to train."""
