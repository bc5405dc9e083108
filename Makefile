# tokenprune: install, run the embedded default, run the tests.
PYTHON ?= python
# torch (+ the matching torchvision that transformers' Qwen2-VL video processor needs) is installed
# first and pinned, so that pip never resolves a different multi-GB build on its own.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# test processes (pytest-xdist): the suite is sized for 2 cores
TEST_WORKERS ?= 2

.PHONY: install run test

install:
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e '.[dev]'

run: install
	$(PYTHON) -m tokenprune

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS)
