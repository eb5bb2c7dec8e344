# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the embedded synthetic world
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FORCE  ?= 0

.PHONY: install demo test test-other-cpu test-slurm bench clean-demo

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "CORTEX needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

DEMO_ARGS ?=
demo: install
	FORCE=$(FORCE) $(PY) -m cortex.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q tests

# The suite as another CPU computes it: ATen without SIMD kernels, oneDNN at SSE4.1, MKL at SSE4.2, one thread
# (other float rounding than any native run, so other tiny IEMs; no test may depend on one run's exact outcome)
OTHER_CPU := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1
test-other-cpu: install
	$(OTHER_CPU) $(PY) -m pytest -q tests

# SLURM pipeline tests on a private one-node cluster: as root, installs slurmctld slurmd slurm-client munge
# if missing; skips (with the reason, shown by -ra) where root or the packages are unavailable.
test-slurm: install
	bash scripts/slurm_test_cluster.sh install || [ $$? -eq 77 ]
	$(PY) -m pytest -q -ra tests_slurm

bench: install
	$(PY) bench/bench_loading.py
	$(PY) bench/bench_tis.py
	$(PY) bench/bench_cliff.py

clean-demo:
	rm -rf VQGAN_explanation/datasets VQGAN_explanation/checkpoints VQGAN_explanation/logs VQGAN_explanation/results \
	       VQGAN_explanation/scattered_world results/demo_report.md \
	       Dalle_explanation/datasets Dalle_explanation/checkpoints Dalle_explanation/logs Dalle_explanation/results
