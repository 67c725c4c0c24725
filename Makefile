# deepseek_v3.hpp — build the examples, the tests and the benchmarks.
#   make            every CPU example into build/
#   make train      the main job: train the tiny model (Tiny Shakespeare if data/tinyshakespeare.txt exists,
#                   else the built-in synthetic corpus)
#   make test       the doctest suite, build/train's Ctrl-C and --resume (tests/train_resume.sh), every example's
#                   command line (tests/flags.sh), then the MPI tests when MPI is installed
#   make test-flags every example's --help, and its refusal of unknown options and malformed values, naming the flag
#   make mpi        build/train_mpi and build/test_mpi over MPI (optional; see the MPI section at the end)
#   make bench      the benchmarks
#   make bench-shared  training and decoding speed on a CPU shared with busy processes (examples/bench_shared.sh)
#   make data       download Tiny Shakespeare and prepare its token files: bytes (v256) and BPE (v512), for
#                   build/train --tokens data/tinyshakespeare_v512_train.bin
#   make test-san   the test suite under AddressSanitizer and UBSan, the rank tests under ThreadSanitizer (clang)
#   make fuzz       libFuzzer harnesses of every file parser (clang); make fuzz-run FUZZ_SECONDS=N runs them
#   make clean
# CXX and CXXFLAGS can be overridden; threads come from OMP_NUM_THREADS.

CXX      ?= g++
CXXFLAGS ?= -O3 -march=native -fopenmp -std=c++17 -Wall -Wextra
BUILD    := build
HEADER   := deepseek_v3.hpp
EXAMPLES := $(patsubst examples/%.cpp,%,$(wildcard examples/*.cpp))
TESTS    := $(wildcard tests/*.cpp)
# OpenBLAS is optional: the benchmark compares against it when a program using its cblas header links
# (a header from another BLAS, such as netlib's libblas-dev, is not enough).
OPENBLAS := $(shell printf '\043include <cblas.h>\nint main(){return 0;}\n' | $(CXX) -x c++ - -lopenblas -o /dev/null 2>/dev/null && echo yes)
ifeq ($(OPENBLAS),yes)
BENCH_FLAGS := -DDSV3_BENCH_OPENBLAS -lopenblas
endif
TRAIN_ARGS ?=

.PHONY: all train test bench bench-shared data clean deps
all: $(EXAMPLES:%=$(BUILD)/%)

# doctest (tests) and stb (PNG output) come from Debian packages; install them when we can, else say how.
# Every compile rule below (examples, bench, test objects, the tests link, CUDA) has the stamp $(BUILD)/.deps as an
# order-only prerequisite, so under make -jN this check (and any apt-get install) runs first, exactly once, and
# nothing compiles before it. The headers are looked for in /usr/include and in the -I directories of CXXFLAGS and
# CUDA_INC (a copy of them on a machine without the packages). When they are all found and the stamp exists, nothing
# runs; when one is missing, the recipe runs again on every make until it is found. `make deps` is an alias.
DEP_FILES   := doctest/doctest.h stb/stb_image_write.h
DEP_DIRS    := /usr/include $(patsubst -I%,%,$(filter -I%,$(CXXFLAGS) $(CUDA_INC)))
DEP_MISSING := $(strip $(foreach f,$(DEP_FILES),$(if $(wildcard $(addsuffix /$(f),$(DEP_DIRS))),,$(f))))

.PHONY: FORCE
deps: $(BUILD)/.deps

$(BUILD)/.deps: $(if $(DEP_MISSING),FORCE) | $(BUILD)
	@if [ -n "$(DEP_MISSING)" ]; then \
	  echo "Missing headers: $(DEP_MISSING)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq doctest-dev libstb-dev; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq doctest-dev libstb-dev; \
	  else echo "Missing doctest/stb headers. Run:  sudo apt-get install -y doctest-dev libstb-dev"; exit 1; fi; \
	fi
	@touch $@

$(BUILD):
	@mkdir -p $(BUILD)

$(BUILD)/bench: examples/bench.cpp $(HEADER) | $(BUILD)/.deps
	$(CXX) $(CXXFLAGS) $< -o $@ $(BENCH_FLAGS)

$(BUILD)/%: examples/%.cpp $(HEADER) | $(BUILD)/.deps
	$(CXX) $(CXXFLAGS) $< -o $@
$(BUILD)/search: examples/search.hpp

# Each test file compiles on its own (in parallel: the header is large), then one link.
TEST_OBJS := $(TESTS:tests/%.cpp=$(BUILD)/tests.o/%.o)
$(BUILD)/tests.o/%.o: tests/%.cpp $(HEADER) $(wildcard tests/*.hpp) examples/search.hpp | $(BUILD)/.deps
	@mkdir -p $(BUILD)/tests.o
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/tests: $(TEST_OBJS) | $(BUILD)/.deps
	$(CXX) $(CXXFLAGS) $^ -o $@

NPROC := $(shell nproc 2>/dev/null || echo 2)
test: deps
	@$(MAKE) --no-print-directory -j$(NPROC) $(BUILD)/tests all
	./$(BUILD)/tests
	tests/train_resume.sh
	tests/flags.sh
	@$(MAKE) --no-print-directory test-mpi

# Every example's --help, and its refusal of an unknown option or a malformed value with the flag's name
# (tests/flags.sh; CI runs it).
.PHONY: test-flags
test-flags: all
	tests/flags.sh

train: $(BUILD)/train
	./$(BUILD)/train $(TRAIN_ARGS)

bench: $(BUILD)/bench
	./$(BUILD)/bench

# Training and decoding speed on a shared CPU: quiet, beside two busy processes, and with one thread (about a minute).
bench-shared: $(BUILD)/train $(BUILD)/generate
	examples/bench_shared.sh

data: $(BUILD)/prepare_data
	bash data/download.sh
	./$(BUILD)/prepare_data --text data/tinyshakespeare.txt --vocab 256 --out-dir data
	./$(BUILD)/prepare_data --text data/tinyshakespeare.txt --vocab 512 --out-dir data

clean:
	rm -rf $(BUILD)

# ---- sanitizers and fuzzing (clang from Debian: sudo apt-get install -y clang libclang-rt-dev libomp-dev) ----------
# make test-san builds the whole test suite with AddressSanitizer (LeakSanitizer included) and UndefinedBehaviorSanitizer
# at -O1 into build/san/ and runs it, then the rank and communicator tests (tests/test_parallel.cpp: ranks are
# std::threads) with ThreadSanitizer into build/tsan/, without OpenMP (libomp is not built for ThreadSanitizer, so
# its barriers would look like races). Any report fails the run. About 2.5 minutes in all on 2 cores.
SAN_CXX    ?= clang++
SAN_FLAGS  ?= -O1 -g0 -fopenmp -std=c++17 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
TSAN_FLAGS ?= -O1 -g0 -std=c++17 -fsanitize=thread
.PHONY: test-san fuzz fuzz-run
$(BUILD)/san/%.o: tests/%.cpp $(HEADER) $(wildcard tests/*.hpp) | $(BUILD)/.deps
	@mkdir -p $(BUILD)/san
	$(SAN_CXX) $(SAN_FLAGS) -c $< -o $@
$(BUILD)/san/tests: $(TESTS:tests/%.cpp=$(BUILD)/san/%.o)
	$(SAN_CXX) $(SAN_FLAGS) $^ -o $@
$(BUILD)/tsan/%.o: tests/%.cpp $(HEADER) $(wildcard tests/*.hpp) | $(BUILD)/.deps
	@mkdir -p $(BUILD)/tsan
	$(SAN_CXX) $(TSAN_FLAGS) -c $< -o $@
$(BUILD)/tsan/tests: $(BUILD)/tsan/main.o $(BUILD)/tsan/test_parallel.o
	$(SAN_CXX) $(TSAN_FLAGS) $^ -o $@
test-san: deps
	@$(MAKE) --no-print-directory -j$(NPROC) $(BUILD)/san/tests $(BUILD)/tsan/tests
	UBSAN_OPTIONS=print_stacktrace=1 ./$(BUILD)/san/tests
	./$(BUILD)/tsan/tests

# make fuzz builds one libFuzzer program a parser (tests/fuzz/*.cpp: json, safetensors, checkpoint, tokens, tokenizer,
# npy) with AddressSanitizer and UBSan, and build/fuzz/make_seeds, which writes their first inputs with the header's
# own writers. make fuzz-run runs each for FUZZ_SECONDS (tests/fuzz/run.sh: limits, and what counts as a finding).
FUZZ_CXX     ?= clang++
FUZZ_FLAGS   ?= -O1 -g -std=c++17 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_TARGETS := $(filter-out make_seeds,$(patsubst tests/fuzz/%.cpp,%,$(wildcard tests/fuzz/*.cpp)))
FUZZ_SECONDS ?= 20
fuzz: deps
	@$(MAKE) --no-print-directory -j$(NPROC) $(FUZZ_TARGETS:%=$(BUILD)/fuzz/%) $(BUILD)/fuzz/make_seeds
$(BUILD)/fuzz/make_seeds: tests/fuzz/make_seeds.cpp $(HEADER) | $(BUILD)/.deps
	@mkdir -p $(BUILD)/fuzz
	$(FUZZ_CXX) -O1 -std=c++17 $< -o $@
$(BUILD)/fuzz/%: tests/fuzz/%.cpp tests/fuzz/fuzz.hpp $(HEADER) | $(BUILD)/.deps
	@mkdir -p $(BUILD)/fuzz
	$(FUZZ_CXX) $(FUZZ_FLAGS) $< -o $@
fuzz-run: fuzz
	tests/fuzz/run.sh $(FUZZ_SECONDS)
# ---- end sanitizers and fuzzing ------------------------------------------------------------------------------------

# ---- CUDA ----------------------------------------------------------------------------------------------------------
# Optional GPU backend (cuda/): `make cuda` builds every CUDA program (the list below, plus build/dev_* from each
# cuda/dev_*.cu) with nvcc; `make test-cuda` runs the GPU tests. Nothing above needs CUDA. CUDA_ARCH=90 (Hopper)
# builds for sm_90a, the target with wgmma (the FP8 GEMM's tensor-core path). It uses the -gencode form because
# -arch=sm_90a also runs a plain sm_90 pass, which rejects wgmma. Any other CUDA_ARCH builds plain sm_$(CUDA_ARCH),
# where fp8_gemm falls back to its CUDA-core emulation.
# CUDA_INC adds include paths (doctest, stb) on machines without the Debian packages.
NVCC       ?= nvcc
CUDA_ARCH  ?= 90
ifeq ($(CUDA_ARCH),90)
CUDA_GENCODE ?= -gencode=arch=compute_90a,code=sm_90a
else
CUDA_GENCODE ?= -arch=sm_$(CUDA_ARCH)
endif
CUDA_INC   ?=
NVCCFLAGS  ?= -O3 -std=c++17 $(CUDA_GENCODE) -Xcompiler -fopenmp $(CUDA_INC)
CUDA_DEPS  := $(HEADER) $(wildcard cuda/*.cuh)
# Development programs: each cuda/dev_*.cu (zero or more) builds to build/dev_*.
CUDA_DEV   := $(patsubst cuda/%.cu,$(BUILD)/%,$(wildcard cuda/dev_*.cu))

.PHONY: cuda test-cuda
cuda: $(BUILD)/test_cuda $(BUILD)/bench_cuda $(BUILD)/test_multi_gpu $(BUILD)/bench_multi_gpu $(BUILD)/train_multi_gpu \
      $(BUILD)/generate_cuda $(BUILD)/train_cuda $(CUDA_DEV)

# test_cuda's last case runs 20 steps of build/train and build/train_cuda and compares the losses.
test-cuda: $(BUILD)/test_cuda $(BUILD)/test_multi_gpu $(BUILD)/train $(BUILD)/train_cuda
	./$(BUILD)/test_cuda
	./$(BUILD)/test_multi_gpu

$(BUILD)/test_cuda: cuda/test_cuda.cu $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

$(BUILD)/bench_cuda: cuda/bench_cuda.cu $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

# Multi-GPU communication over peer copies, no NCCL (cuda/comm.cuh): tests and bandwidth on all visible GPUs.
$(BUILD)/test_multi_gpu: cuda/test_multi_gpu.cu $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

$(BUILD)/bench_multi_gpu: cuda/bench_multi_gpu.cu $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

$(BUILD)/generate_cuda: cuda/generate_cuda.cu $(CUDA_DEPS) examples/generate.cpp | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

$(BUILD)/train_multi_gpu: cuda/train_multi_gpu.cu $(CUDA_DEPS) $(wildcard examples/*.cpp) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

# The model on the GPU: build/train_cuda is examples/train.cpp compiled with DSV3_BACKEND_CUDA (cuda/train_cuda.cu),
# the header's Model, train_step and AdamW on the kernels of cuda/, same options (--preset small for the GPU preset).
$(BUILD)/train_cuda: cuda/train_cuda.cu examples/train.cpp $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas

# Each cuda/dev_*.cu builds to build/dev_* (make prefers this rule to $(BUILD)/%: examples/%.cpp: its stem is shorter).
$(BUILD)/dev_%: cuda/dev_%.cu $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas
# ---- end CUDA ------------------------------------------------------------------------------------------------------

# ---- MPI -----------------------------------------------------------------------------------------------------------
# Optional: ranks as processes, on one machine or many, over MPI (header section 9.3b). Open MPI from Debian:
#   sudo apt-get install -y libopenmpi-dev openmpi-bin
# `make mpi` builds build/train_mpi (examples/train.cpp compiled with -DDSV3_MPI) and build/test_mpi (the MPI tests and,
# with `bench`, the collectives' timing). `make test-mpi` runs tests/mpi/run.sh (mpirun with 2 and 4 processes);
# `make test` runs it too, or says that it skips it when mpicxx or mpirun is missing. `make mpi-cuda` builds
# build/train_mpi_cuda, the same program on the GPU backend (device buffers staged through host memory). Nothing
# else in this Makefile needs MPI.
MPICXX   ?= mpicxx
HAVE_MPI := $(shell command -v $(MPICXX) >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 && echo yes)
MPI_INC   = $(filter -I%,$(shell $(MPICXX) --showme:compile 2>/dev/null))
MPI_LIBS  = $(filter -L% -l%,$(shell $(MPICXX) --showme:link 2>/dev/null))

.PHONY: mpi test-mpi mpi-cuda
mpi: $(BUILD)/train_mpi $(BUILD)/test_mpi

$(BUILD)/train_mpi: examples/train.cpp $(HEADER) | $(BUILD)/.deps
	$(MPICXX) $(CXXFLAGS) -DDSV3_MPI $< -o $@

$(BUILD)/test_mpi: tests/mpi/test_mpi.cpp tests/parallel_helpers.hpp $(HEADER) | $(BUILD)/.deps
	$(MPICXX) $(CXXFLAGS) -DDSV3_MPI $< -o $@

test-mpi:
ifeq ($(HAVE_MPI),yes)
	@$(MAKE) --no-print-directory -j$(NPROC) $(BUILD)/train $(BUILD)/train_mpi $(BUILD)/test_mpi
	tests/mpi/run.sh
else
	@echo "MPI tests skipped: $(MPICXX) or mpirun not found (sudo apt-get install -y libopenmpi-dev openmpi-bin)"
endif

mpi-cuda: $(BUILD)/train_mpi_cuda
$(BUILD)/train_mpi_cuda: cuda/train_mpi.cu examples/train.cpp $(CUDA_DEPS) | $(BUILD)/.deps
	$(NVCC) $(NVCCFLAGS) $(MPI_INC) $< -o $@ -lcublas $(MPI_LIBS)
# ---- end MPI -------------------------------------------------------------------------------------------------------
