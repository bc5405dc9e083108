"""Searches that produce method policies (``python -m tokenprune.calibrate <search> ...``): layer skip."""
