"""Vectorized torch scans over time (log-depth); the code lives in the torch-only runtime.

Kept as a module so callers can name the scans without knowing where the runtime keeps them.
"""

from .standalone import associative_scan, sequential_scan, tree_scan  # noqa: F401
