"""``python -m tokenprune.merge RUN_DIR...``: merge the shards of run directories (see ``tokenprune/run/merge.py``)."""

from .run.merge import main

if __name__ == "__main__":
    main()
