# make demo | make test | make setup | make cpu-targets | make avx2-cpu-test   (VENV=/path/to/venv: another virtualenv)
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup setup-test test demo demo-classify cpu-targets avx2-cpu-test

setup:
	VENV="$(VENV)" bash scripts/setup_env.sh

setup-test:
	VENV="$(VENV)" bash scripts/setup_env.sh --test

test: setup-test
	$(PYTHON) -m pytest -q tests

# The main job: train MViTv2-T Mask R-CNN on the built-in toy dataset on the CPU, evaluate, visualise.
demo: setup
	$(PYTHON) tools/main_job.py

# The classification main job: train MViTv2-T on scikit-learn's handwritten digits, report held-out top-1,
# draw predictions and the confusion matrix, classify held-out images with the trained checkpoint.
demo-classify: setup
	$(PYTHON) tools/demo_classify.py

# Issue 11's CPU targets on this machine: the benchmark runs and the main job, each target judged on the median of its
# runs; the verdicts, a README table row and every run's table in output/cpu_targets/cpu_targets.md.
cpu-targets: setup-test
	$(PYTHON) -m benchmarks.cpu_targets output/cpu_targets --main-job

# The precision tests on an emulated AVX2-only CPU (QEMU's user mode, a Haswell model), so that torch and oneDNN pick
# their AVX2 kernels from CPUID, as on such a laptop; downloads QEMU 10 when none is installed. Correctness only.
avx2-cpu-test: setup-test
	VENV="$(VENV)" bash scripts/avx2_cpu_test.sh --fetch
