# tokenprune: install, run the embedded default, run the tests, regenerate the measured tables of README.md and docs/.
PYTHON ?= python
# torch (+ the matching torchvision that transformers' Qwen2-VL video processor needs) is installed
# first and pinned, so that pip never resolves a different multi-GB build on its own.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# test processes (pytest-xdist): the suite is sized for 2 cores
TEST_WORKERS ?= 2

.PHONY: install run test tables tables-render

install:
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e '.[dev]'

run: install
	$(PYTHON) -m tokenprune

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS)

# Every table of measured numbers in README.md and docs/ (benchmarks/_tables.py): measure each source in a fresh
# process, write docs/tables/<source>.json, re-render the tables between their markers. 2 h or more on 2 idle CPU cores;
# `python benchmarks/tables.py <source> ...` redoes some. tables-render only re-renders from the committed data.
tables:
	$(PYTHON) benchmarks/tables.py

tables-render:
	$(PYTHON) benchmarks/tables.py --render
