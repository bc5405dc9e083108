"""How pruning happens inside a decoder, independent of the model family.

layout.py (TokenLayout) · driver.py (the hooks between layers) · scores.py (lazy attention rows) ·
sublayers.py (layer plans) · flops.py (analytic FLOPs) · apply.py (the context manager).
"""
