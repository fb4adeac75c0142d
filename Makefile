# The two commands of the README:
#   make run   installs labelgrid into .venv and runs the stack on the embedded default
#   make test  installs everything the tests need and runs every test
# Every pip call goes through constraints.txt (torch must stay the local CPU wheel, and the
# gRPC / protobuf stack must match the committed generated code).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip
BUF    := BUF_CACHE_DIR=$(CURDIR)/.buf-cache $(VENV)/bin/buf
VAR    ?= var
STUDIES ?= $(VAR)/studies
PORT   ?= 8000

NPM         ?= npm
NODE_CLIENT := clients/node

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-dev install-node install-prometheus install-orthanc install-chromium install-go install-java go-client java-client protos node-protos check-protos lint protos-baseline bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps make re-installs cheap: they are redone only when the dependency files change.
# The OHIF viewer the gateway serves at /ohif/ is the build inside MONAI Label's wheel
# (monailabel/endpoints/static/ohif/, 51 MB, never copied into git): installed --no-deps.
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps monailabel==0.8.5
	touch $@

# monailabel==0.8.5 is installed without its (large, unpinned) dependency list: the tests
# use only its LocalDatastore and client, whose imports the dev extra provides.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps monailabel==0.8.5
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The Node client's packages exactly as locked; redone only when package.json / the lock change.
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@command -v node >/dev/null && command -v $(NPM) >/dev/null || { echo "make test needs node >= 20 and npm" >&2; exit 1; }
	$(NPM) ci --prefix $(NODE_CLIENT) --no-audit --no-fund
	touch $@

install-node: $(NODE_CLIENT)/node_modules/.installed

# prometheus + promtool for the metrics integration test (Debian's package), once per machine.
install-prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

# Orthanc with its DICOMweb plugin (Debian's packages) for the OHIF / DICOMweb tests, once per
# machine; the tests start their own Orthanc on a free loopback port (the package's daemon is not used).
ORTHANC_PACKAGES := orthanc orthanc-dicomweb

install-orthanc:
	@$(call all_installed,$(ORTHANC_PACKAGES)) || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(ORTHANC_PACKAGES); }

# Debian's Chromium for the OHIF browser test (driven by Playwright from PyPI with this
# executable; Playwright's own browser download is never used), once per machine.
install-chromium:
	@$(call all_installed,chromium) || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

# Toolchains of the Go and Java clients (Debian's packages), once per machine: apt-get runs only
# when one of them is missing. clients/build.py generates and builds each client, cached under
# build/clients by a hash of protos/ and the client's sources.
GO_PACKAGES   := golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
                 golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
JAVA_PACKAGES := default-jdk-headless protobuf-compiler libgrpc-java protobuf-compiler-grpc-java-plugin \
                 libprotobuf-java libnetty-java libperfmark-java libgoogle-gson-java \
                 libgeronimo-annotation-1.3-spec-java

# True when every package of $(1) is installed ("ii"), not merely known to dpkg.
all_installed = test "$$(dpkg-query -W -f='$${db:Status-Abbrev}\n' $(1) 2>/dev/null | grep -c '^ii')" = "$(words $(1))"

install-go:
	@$(call all_installed,$(GO_PACKAGES)) || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(GO_PACKAGES); }

install-java:
	@{ command -v javac >/dev/null 2>&1 && $(call all_installed,$(filter-out default-jdk-headless,$(JAVA_PACKAGES))); } || { \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(JAVA_PACKAGES); }

go-client: install-dev install-go
	$(PY) clients/build.py go

java-client: install-dev install-java
	$(PY) clients/build.py java

run: install
	$(VENV)/bin/labelgrid up --studies $(STUDIES) --sample-studies --port $(PORT)

test: install-dev install-node install-prometheus install-orthanc install-chromium install-go install-java check-protos lint
	$(PY) -m pytest

# ruff (lint, then the formatter's check) and mypy, with the config in pyproject.toml.
lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

protos: install-dev
	$(PY) scripts/gen_protos.py

# Regenerate the committed JS / .d.ts of the Node client from protos/.
node-protos: install-dev install-node
	$(BUF) generate --template $(NODE_CLIENT)/buf.gen.yaml

# Lint and format the contracts, prove the committed generated code is what the .proto
# files produce, and refuse wire/source breaking changes against the recorded baseline.
check-protos: install-dev
	$(BUF) lint
	$(BUF) format --diff --exit-code protos
	$(PY) scripts/gen_protos.py
	git diff --exit-code --stat -- protos/gen || (echo "protos/gen is stale: run 'make protos' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain --untracked-files=all -- protos/gen)" || (echo "protos/gen has untracked files: run 'make protos' and commit" >&2; exit 1)
	$(BUF) breaking --against protos/baseline.binpb

# Record the current contracts as the baseline `buf breaking` compares against (only when a
# breaking change is intended and announced).
protos-baseline: install-dev
	$(BUF) build --exclude-source-info -o protos/baseline.binpb

bench: install-dev
	$(PY) -m bench.datastore
	$(PY) -m bench.infer
	$(PY) -m bench.batch_infer
	$(PY) -m bench.batching
	$(PY) -m bench.activelearning
	$(PY) -m bench.train
	$(PY) -m bench.bundle

clean:
	rm -rf $(VAR) .pytest_cache .buf-cache
