# Two commands for a user: `make demo` and `make test`. Both create .venv/ first when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ET     := $(BIN)/elastictrain
DEMO   := runs/demo

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data lint test demo demo-single demo-compress bench bench-setup gpu-check clean

setup: $(STAMP)

# Fashion-MNIST (31 MB, Debian's dataset-fashion-mnist) is the embedded default data set; it is
# installed from the distribution's packages where apt is available and we are root.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root"; exit 1; fi; \
	fi

# torch first (a large CUDA build; pinned in constraints.txt), then DeepSpeed without build
# isolation (its build imports torch; isolated, pip would fetch a second torch) and with its CPU
# shared-memory collective compiled now rather than at the first run (~60 s), then the rest with
# the dev and deploy extras (deploy: onnx, onnxruntime, onnxscript for `elastictrain deploy`), then
# the runtime's compiled kernels (elastictrain/runtime/csrc, ~40 s; cached under ~/.cache/elastictrain).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "setuptools>=64" wheel
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e '.[dev,deploy]'
	$(BIN)/python -c 'from elastictrain.runtime import ext; ext.main()'
	touch $(STAMP)

# ruff first (lint, import order, 120-column lines: pyproject.toml's [tool.ruff]), then the suite
test: setup data lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# The main job: the four-stage quickstart pipeline on Fashion-MNIST, on the embedded default
# cluster (configs/clusters/local.yaml: in-process Ray, 2 workers, each a DeepSpeed engine).
demo: setup data
	$(ET) run configs/experiments/quickstart.yaml --out $(DEMO)/quickstart

# The same on one process, no Ray (also what a single-GPU box runs).
demo-single: setup data
	$(ET) run configs/experiments/quickstart.yaml --cluster configs/clusters/single.yaml --out $(DEMO)/quickstart-single

# One-shot compression of VGG16 with the heaviest mixture (no training).
demo-compress: setup
	@mkdir -p $(DEMO)
	$(ET) init vgg16 --out $(DEMO)/vgg16.pt
	$(ET) compress $(DEMO)/vgg16.pt --spec configs/specs/vgg16-mixture.yaml \
		--out $(DEMO)/vgg16-mixture.pt --report $(DEMO)/vgg16-mixture.json
	$(ET) verify $(DEMO)/vgg16-mixture.pt --spec configs/specs/vgg16-mixture.yaml

# On a machine with a GPU (≤ 8 minutes): the shortened quickstart on the CPU, with CUDA on one
# process, and on one Ray Train worker over NCCL with bf16 autocast under ZeRO-2 and ZeRO-3, then
# `eval --device cuda`; masks and top-1 compared with the CPU run (bench/gpu_check.py writes
# bench/results/gpu-check.json, or $$OUT/gpu-check.json). Exit 3 where no GPU is visible.
gpu-check: setup data
	timeout 480 $(BIN)/python bench/gpu_check.py

# The peer libraries bench/peers.py compares against (bench/requirements.txt: benchmark-only, not
# dependencies of the package); constraints.txt keeps the venv's torch as it is.
bench-setup: setup
	$(BIN)/pip install -c constraints.txt -r bench/requirements.txt

# The CPU benchmarks behind every figure the README quotes; each prints its table and writes
# bench/results/<name>.json (with the machine's description inside). --quick runs write NAME-quick.json.
bench: setup data bench-setup
	$(BIN)/python bench/projection.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/ds_overhead.py
	$(BIN)/python bench/comm.py
	$(BIN)/python bench/comm_link.py              # link_steps in comm.json, comm-link.md: two hosts, tc-limited (root)
	$(BIN)/python bench/scaling.py                # scaling.json/.md: one process vs Ray Train workers, same cores
	$(BIN)/python bench/artifact.py
	$(BIN)/python bench/robust.py                 # robust.json (ε = 8/255)
	$(BIN)/python bench/robust.py --eps 0.1       # robust-eps0.1.json
	$(BIN)/python bench/peers.py --variants magnitude,kd --plain-ours   # peers.json/.md: plain torch.nn.utils.prune, torchao
	$(BIN)/python bench/peers.py --seed 1 --variants magnitude --peers ''   # peers-seed1: for the medians
	$(BIN)/python bench/peers.py --seed 2 --variants magnitude --peers ''
	$(BIN)/python bench/peers_summary.py          # peers-summary: medians of the three seeds
	$(BIN)/python bench/demo.py                   # demo.json/.md: make demo and make demo-single, timed
	$(BIN)/python bench/deploy.py                 # deploy.json/.md: dense vs shrunk vs Torch-Pruning latency and RSS
	$(BIN)/python bench/table.py  # the seed's results table on Fashion-MNIST (VGG-CPU; the longest, see table-cpu.json)

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis
