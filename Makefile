# The two commands of the README:  `make demo` (the main job)  and  `make test`.
# Both install what they need first; torch is installed (pinned, CPU build) only when none is importable.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install torch

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"

install: torch
	$(PYTHON) -m pip install --quiet "setuptools>=70.1" ninja "pytest>=8" numpy scikit-learn matplotlib tqdm
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

demo: install
	$(PYTHON) -m equinorm_kernels.demo

test: install
	$(PYTHON) -m pytest -q tests
