"""How pruning happens inside a decoder, independent of the model family.

contract.py (the types methods and families see: TokenLayout, DecoderInput, PrefillStep, Reduction, LayerPlan,
ModelInfo, input errors; a leaf) · family.py (what the engine needs from a model family, defaults, registry) ·
driver.py (the hooks between layers) · sequence.py (the rows travelling between layers) · cache.py (KV-cache
surgery) · report.py (what a prefill did) · attention.py (recomputed attention math) · scores.py (lazy attention
rows) · sublayers.py (layer plans) · flops.py (analytic FLOPs) · apply.py (the context manager).
"""
