"""Compare the routes on one suite: train jointly, learn in sequence, or merge?

``polytask.compare(suite="digits-merge", seeds=3, out="runs/cmp")`` or ``polytask compare --suite
digits-merge --out runs/cmp``: every route's methods from the same pretrained body, seed and budget,
the references they are measured against (individual fine-tuned models, linear probes), one report.
"""

from polytask.comparison.runner import DEFAULT_METHODS, ROUTES, CompareConfig, compare, parse_methods

__all__ = ["DEFAULT_METHODS", "ROUTES", "CompareConfig", "compare", "parse_methods"]
