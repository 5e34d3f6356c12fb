# The two commands of the README:  `make bench` (the main job)  and  `make test`.
# Both install what they need first; torch is installed (pinned, CPU build) only when none is
# importable, and Triton only when none is (a GPU image brings the one matching its torch).
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0

.PHONY: bench demo test install torch triton

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"

triton:
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install --quiet "$(TRITON_PIN)"

install: torch triton
	$(PYTHON) -m pip install --quiet "setuptools>=70.1" ninja "pytest>=8" numpy scikit-learn matplotlib tqdm
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

bench: install
	$(PYTHON) -m equinorm_kernels.bench --quick

demo: install
	$(PYTHON) -m equinorm_kernels.demo

test: install
	$(PYTHON) -m pytest -q tests
