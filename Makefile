# Two commands do all set-up on a fresh machine:
#   make demo   install into .venv, convert the offline quickstart model, fine-tune it (2 ranks)
#   make test   install into .venv, run the test suite (what CI runs): every tier in one pytest run, three
#               files at a time (tests/distributed, tests/e2e, tests/unit)
#   make test-fast  the unit tier alone, tests/unit (in-process, no launches; a few minutes)
#   make demo-dpo  the same model trained with DPO on the corpus as preference pairs (outputs/dpo)
#   make fuzz   install into .venv, fuzz the input readers with new random cases (FUZZ_EXAMPLES per property)
#   make bench  install into .venv, run the benchmarks (bench/run.py; ~10 min on 2 CPU cores)
#   make bench-smoke  every bench/ script once with --smoke, into a temporary directory (make test runs the same)
#   make roberta-study  the RoBERTa single / DDP / PP x full / LoRA study (bench/roberta_study.py; ~5 min)
#   make bench-peers  our LoRA step against HF Trainer, a plain peft loop and plain DDP (bench/peers.py; ~25 min)
#   make bench-loss-chunks  peak memory and step time with train.loss_chunks on and off (bench/loss_chunks.py)
#   make bench-preference  DPO against SFT on the same pairs, and the reference's memory (bench/preference.py)
PYTHON ?= python3
VENV ?= .venv
NPROC ?= 2
ARGS ?=
PY := $(VENV)/bin/python
# One OpenMP thread per core per rank: more threads than cores slows every rank down.
THREADS = $$(( ($$(nproc) / $(NPROC)) > 0 ? ($$(nproc) / $(NPROC)) : 1 ))
FREE_PORT = $$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

PYTEST = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

.PHONY: install assets demo demo-dpo test test-fast fuzz bench bench-smoke roberta-study bench-peers bench-loss-chunks bench-preference clean

install: $(VENV)/.installed

# --no-compile: Python compiles a module the first time it is imported and keeps the result; pip would compile every
# module of every package now, most never imported (56 s against 97 s for the whole install, wheels cached, 2 cores).
$(VENV)/.installed: requirements.txt requirements-assets.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --no-compile -r requirements.txt -c constraints.txt
	$(PY) -m pip install --no-compile --no-deps -r requirements-assets.txt -c constraints.txt
	touch $@

assets: install
	$(PY) -m finetune.assets

# Our launcher (torchrun from an argument list, no shell; Ctrl-C checkpoints every rank), as in the README.
demo: assets
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=$(THREADS) MASTER_PORT=$(FREE_PORT) \
		launch/single_node.sh $(NPROC) overwrite_output_dir=true $(ARGS)

# Preference training, offline: each corpus turn's own reply chosen over an off-topic one (docs/preference.md).
demo-dpo: assets
	$(MAKE) demo ARGS="task=preference data.train_path=chatterbot-corpus:preference output_dir=outputs/dpo $(ARGS)"

# Tiers are folders, each with its pytest marker (pytest.ini): tests/unit (unmarked tests), tests/e2e,
# tests/distributed; a test in the wrong folder fails the collection (tests/conftest.py). One pytest run over the
# three tiers on three xdist workers: a multi-rank test keeps the cores about 73% busy (its ranks wait on each other
# and on gloo) and a one-process test one core, so a third worker fills what the others leave idle (13.5 + 8 min in
# two runs before, 12 min in one, on 2 cores). A file's tests stay on one worker (module fixtures are shared
# launches); the distributed files come first, so their long shared launches start first.
test: install
	$(PYTEST) tests/distributed tests/e2e tests/unit -n 3 --dist loadfile --durations=30

test-fast: install
	$(PYTEST) tests/unit -n 2 --dist loadfile --durations=10

# Nightly-sized, with new random cases: CI's run of the fuzz tests takes the same cases each time.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" FUZZ_RANDOM=1 FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests/unit/test_fuzz_inputs.py tests/e2e/test_fuzz_checkpoint.py -k "not cli" -p no:cacheprovider

# The benchmark launches its own ranks (torchrun) with one OpenMP thread per core per rank.
BENCH_ENV = env -u MAKEFLAGS -u MFLAGS -u MAKEOVERRIDES PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
bench: install
	$(BENCH_ENV) $(PY) bench/run.py $(ARGS)

# Each script with --smoke: its real path on a tiny model, a few steps (tests/e2e/test_bench_smoke.py in `make test`).
bench-smoke: install
	@dir=$$(mktemp -d -t bench-smoke-XXXXXX) && \
	for script in run packing roberta_study peers loss_chunks preference; do $(BENCH_ENV) $(PY) bench/$$script.py --smoke --results $$dir/$$script || exit 1; done && \
	$(BENCH_ENV) $(PY) bench/plain_loop.py --smoke $$dir/plain_loop/plain_loop.json && \
	echo "bench smoke results: $$dir"

roberta-study: install
	$(BENCH_ENV) $(PY) bench/roberta_study.py $(ARGS)

bench-peers: assets
	$(BENCH_ENV) $(PY) bench/peers.py $(ARGS)

bench-loss-chunks: assets
	$(BENCH_ENV) $(PY) bench/loss_chunks.py $(ARGS)

bench-preference: assets
	$(BENCH_ENV) $(PY) bench/preference.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache bench/results
