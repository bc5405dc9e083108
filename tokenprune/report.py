"""``python -m tokenprune.report DIR...``: merge run directories into a Markdown table and PNG plots."""

from .run.report import main

if __name__ == "__main__":
    main()
