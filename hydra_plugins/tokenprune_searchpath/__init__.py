"""tokenprune's Hydra search-path plugin (see tokenprune_searchpath.py)."""
