# The two commands of the README:  `make bench` (the main job)  and  `make test`.
# Both install what they need first; torch is installed (pinned, CPU build) only when none is
# importable, and Triton only when none is (a GPU image brings the one matching its torch).
# `make gpu-check OUT=<folder>` is for a GPU machine: it builds and checks there, installing nothing.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
# Extra pytest arguments for `make test` (CI's second torch leaves out what does not depend on torch).
TEST_ARGS ?=

.PHONY: bench demo test install torch triton cuda-emulation gpu-check

torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"

triton:
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install --quiet "$(TRITON_PIN)"

install: torch triton
	$(PYTHON) -m pip install --quiet "setuptools>=70.1" ninja "pytest>=8" hypothesis numpy scikit-learn matplotlib tqdm
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

bench: install
	$(PYTHON) -m equinorm_kernels.bench --quick

demo: install
	$(PYTHON) -m equinorm_kernels.demo

test: install
	$(PYTHON) -m pytest -q tests $(TEST_ARGS)

# The CUDA kernels executed on the CPU: plain, ASan+UBSan and TSan builds (needs g++ and the CUDA
# headers, no GPU and not the compiled extension), and their launch plans against the machine model;
# also part of `make test`.
cuda-emulation: torch
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install --quiet "pytest>=8"
	$(PYTHON) -m pytest -q tests/test_cuda_emulation.py tests/test_cuda_launch_plans.py

gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=<folder for its logs and results>"; exit 2; }
	$(PYTHON) tools/gpu_check.py "$(OUT)"
