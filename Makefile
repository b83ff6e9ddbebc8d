# vlm-servicer: `make serve` and `make test` each set up what they need on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The default: a tiny Qwen2-VL trained to read shapes (committed; `make shapes-model` retrains it).
MODEL ?= models/tiny-qwen2-vl-shapes
HOST  ?= 127.0.0.1
PORT  ?= 50051
ARGS  ?=
# glibc's malloc on transparent huge pages (see deploy/Dockerfile); set GLIBC_TUNABLES to choose your own.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# vLLM engine flags for the tiny default on a CPU: float32 (exact HF parity), a 1 GiB KV
# reservation (vLLM's CPU default wants 92% of a NUMA node), eager mode (fast start).
ENGINE_ARGS ?= --dtype float32 --max-model-len 4096 --enforce-eager --kv-cache-memory-bytes 1073741824 \
               --limit-mm-per-prompt '{"image": 8, "video": 0}'
PYTEST_ARGS ?=

SETUP_STAMP := $(VENV)/.vlm-servicer-setup
PROTO_OUT   := proto/vlm_proto/vllm_engine_pb2.py

INCUMBENT_VENV ?= .venv-incumbent
BENCH_ARGS ?=

.PHONY: setup model shapes-model shifted-model serve lint test bench bench-replicas loadtest incumbent clean

setup: $(SETUP_STAMP) $(PROTO_OUT)

$(SETUP_STAMP): pyproject.toml scripts/setup_venv.sh scripts/fix_torchvision.py
	bash scripts/setup_venv.sh $(VENV)
	touch $@

$(PROTO_OUT): proto/vlm_proto/*.proto $(SETUP_STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/vlm_proto/*.proto

# The random tiny checkpoints, one per registered family (engine_adapter/families), each built into the
# folder its recipe names; rebuilt when the recipe, tinyvlm/build.py or tinyvlm/tokenizer.py changes.
model: setup
	$(PY) -m tinyvlm.build --all

# The committed "after one training step" checkpoint for RL refits (tests, examples/rl_loop.py): 150 optimizer
# steps from the trained default towards shifted answers (about a minute on 2 CPU cores).
shifted-model: setup
	$(PY) -m tinytrain.finetune --src $(MODEL) --out models/tiny-qwen2-vl-shapes-shifted --steps 150

# Retrain the committed checkpoint (15–30 minutes on 2 CPU cores); writes train_log.jsonl and metrics.json;
# fails if a held-out question stays under 90%: not every run learns colour (docs/tiny-model.md).
shapes-model: setup
	$(PY) -m tinytrain.train --out models/tiny-qwen2-vl-shapes

serve: setup
	GLIBC_TUNABLES=$(GLIBC_TUNABLES) $(VENV)/bin/vlm-servicer serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ENGINE_ARGS) $(ARGS)

# Lint, format and types: zero findings on the servicer and the engine adapter (configured in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check servicer engine_adapter
	$(VENV)/bin/ruff format --check servicer engine_adapter
	$(VENV)/bin/mypy

test: setup model lint
	$(PY) -m pytest $(PYTEST_ARGS)

incumbent: $(INCUMBENT_VENV)/.incumbent-setup
$(INCUMBENT_VENV)/.incumbent-setup: bench/incumbent_env.sh scripts/fix_torchvision.py
	bash bench/incumbent_env.sh $(INCUMBENT_VENV)
	touch $@

# Measurements, never assertions: rollout (reference by hash), side by side with the incumbent
# (`vllm serve --grpc`), tensor transport (inline vs shared memory), replicas behind SMG by routing policy,
# TLS and tracing on vs off.
bench: setup model incumbent
	$(PY) -m bench.rollout
	$(PY) -m bench.side_by_side --incumbent-venv $(INCUMBENT_VENV) $(BENCH_ARGS)
	$(PY) -m bench.transport --incumbent-venv $(INCUMBENT_VENV)
	$(PY) -m bench.replicas
	$(PY) -m bench.tls_tracing
	$(PY) -m bench.refit

bench-replicas: setup model
	$(PY) -m bench.replicas $(BENCH_ARGS)

# Expects a running servicer (make serve) at HOST:PORT; uses ghz when it is on PATH.
loadtest: setup
	HOST=$(HOST) PORT=$(PORT) VENV=$(VENV) bash bench/loadtest.sh

# The random checkpoints are every models/ folder whose RECIPE is a random recipe's (the trained one stays).
clean:
	rm -rf $(VENV) $(dir $(shell grep -l -- "-random-" models/*/RECIPE 2>/dev/null)) proto/vlm_proto/*_pb2*.py proto/vlm_proto/*_pb2.pyi
