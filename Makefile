# Two commands for a user: `make demo` and `make test`. Both create .venv/ first when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ET     := $(BIN)/elastictrain
DEMO   := runs/demo

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch first (a large CUDA build; pinned in constraints.txt), then DeepSpeed without build
# isolation (its build imports torch; isolated, pip would fetch a second torch), then the rest.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "setuptools>=64" wheel
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	@mkdir -p $(DEMO)
	$(ET) init vgg16 --out $(DEMO)/vgg16.pt
	$(ET) compress $(DEMO)/vgg16.pt --spec configs/specs/vgg16-mixture.yaml \
		--out $(DEMO)/vgg16-mixture.pt --report $(DEMO)/vgg16-mixture.json
	$(ET) verify $(DEMO)/vgg16-mixture.pt --spec configs/specs/vgg16-mixture.yaml

bench: setup
	$(BIN)/python bench/projection.py

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis
