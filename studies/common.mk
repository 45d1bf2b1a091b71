# Shared by every study (included by <study>.mk). Variables a user may set on the command line:
#   SCALE=cpu|full|smoke   cpu (default): fits 2 CPU cores; full: the original configuration, for a GPU
#                          machine with the full data; smoke: a few images and one epoch, for the test suite
#   WORK=DIR               where artifacts go [runs/SCALE]; RESULTS=DIR where the report goes
#   RESOPT=CMD             the resopt command [../.venv/bin/resopt when it exists, else resopt on PATH]
#   CIFAR_TAR=FILE         the CIFAR-10 JPEG archive [../../shared/datasets/cifar10-jpeg.tar.gz]
#   SHARED_MODELS=DIR      the published ResNet-20/56 [../../shared/models]
#   DEVICE=auto|cpu|cuda   for the commands that train; THREADS=N for bench [all cores]
.SECONDEXPANSION:
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

SCALE ?= cpu
ifeq ($(filter $(SCALE),cpu full smoke),)
$(error SCALE must be cpu, full or smoke, not '$(SCALE)')
endif
# $(call pick,SMOKE,CPU,FULL): the value for the current scale.
pick = $(if $(filter smoke,$(SCALE)),$(1),$(if $(filter cpu,$(SCALE)),$(2),$(3)))

HERE := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
# Every recipe line runs through tools/logged-shell, which appends it with its exit code and wall time to
# STUDY_LOG; the report step copies that log to RESULTS/commands.txt (paths relative to the repository).
SHELL := $(HERE)/tools/logged-shell
REPO := $(abspath $(HERE)/..)
RESOPT ?= $(if $(wildcard $(REPO)/.venv/bin/resopt),$(REPO)/.venv/bin/resopt,resopt)
PYTHON ?= $(if $(wildcard $(REPO)/.venv/bin/python),$(REPO)/.venv/bin/python,python3)
CIFAR_TAR ?= $(abspath $(REPO)/../shared/datasets/cifar10-jpeg.tar.gz)
SHARED_MODELS ?= $(abspath $(REPO)/../shared/models)
R20_SRC ?= $(REPO)/models/resnet20-cifar10-akamaster.th
R56_SRC ?= $(SHARED_MODELS)/resnet56-4bfd9763.th
WORK ?= $(HERE)/runs/$(SCALE)
W := $(WORK)/$(STUDY)
export STUDY_LOG := $(W)/commands.log
D := $(WORK)/data/$(STUDY)
# Keep every artifact, even one only a pattern rule names (resopt writes each atomically).
.PRECIOUS: $(W)/%.pt $(W)/%.onnx
# cpu results are the committed ones; other scales keep theirs beside their artifacts.
RESULTS ?= $(if $(filter cpu,$(SCALE)),$(HERE)/results/$(STUDY),$(W)/results)
DEVICE ?= auto
THREADS ?=
WORKERS ?= $(call pick,0,2,8)
SEED ?= 0

# Preprocessing of the published CIFAR ResNets (their README): ImageNet statistics, 32x32.
NORM := --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225

TRAIN_OPTS = --device $(DEVICE) --workers $(WORKERS) --seed $(SEED)
BENCH_OPTS = $(call pick,--batch-size 1 --warmup 1 --iters 2 --min-time 0 --rounds 1,\
               --batch-size 1$(COMMA)32 --warmup 3 --iters 10 --min-time 0.5 --rounds 2,\
               --batch-size 1$(COMMA)32$(COMMA)256 --rounds 3) $(if $(THREADS),--threads $(THREADS))
COMMA := ,

# ---- data: a class-balanced subset of CIFAR-10 (symlinks), sized per study -------------------------------
# smoke cuts its subset from the 2,000/500 JPEGs shipped in examples/, so it needs nothing outside the repo.
CIFAR_ROOT := $(if $(filter smoke,$(SCALE)),$(REPO)/examples/cifar10-mini,$(WORK)/data/cifar10)

$(WORK)/data/cifar10/.unpacked: $(CIFAR_TAR)
	@test -f "$(CIFAR_TAR)" || { echo "error: $(CIFAR_TAR) not found; set CIFAR_TAR to the CIFAR-10 JPEG archive" >&2; exit 2; }
	mkdir -p $(WORK)/data && tar -xzf $(CIFAR_TAR) -C $(WORK)/data && touch $@

$(D)/.ready: $(if $(filter smoke,$(SCALE)),,$(WORK)/data/cifar10/.unpacked)
	$(PYTHON) $(HERE)/tools/subset.py $(CIFAR_ROOT) $(D) --train $(TRAIN_PER_CLASS) --test $(TEST_PER_CLASS) --seed $(SEED)
	touch $@

DATA := $(D)
DATA_DEP := $(D)/.ready
# At SCALE=full a study may read another data set (FULL_DATA, set before the include); the ImageNet studies
# (NEEDS_IMAGENET := 1) read IMAGENET.
ifeq ($(SCALE)$(NEEDS_IMAGENET),full1)
FULL_DATA = $(or $(IMAGENET),$(error SCALE=full needs IMAGENET=/path/to/imagenet (ImageFolder with train/ and test/)))
endif
ifeq ($(SCALE),full)
ifneq ($(FULL_DATA),)
DATA := $(FULL_DATA)
DATA_DEP :=
endif
endif

# ---- the steps every study shares -------------------------------------------------------------------------
# Export verifies against PyTorch on the data in the checkpoint's lineage. smoke exports with the TorchScript
# exporter: the same command, rules and files, without the ~10 s of CPU the default (dynamo) exporter's tracing
# costs each of the ~15 exports of a smoke run; the default exporter is tested in tests/test_export.py.
EXPORT_OPTS := $(call pick,--exporter torchscript,,)
$(W)/%.onnx: $(W)/%.pt
	$(RESOPT) export $< -o $@$(if $(EXPORT_OPTS), $(EXPORT_OPTS))
# Static INT8 (Q/DQ, per-channel weights), calibrated on the study's train split, checked on its test split.
$(W)/%.int8.onnx: $(W)/%.onnx $(DATA_DEP)
	$(RESOPT) quantize $< --mode int8 --calib-data $(DATA) --num-calib $(call pick,50,320,1000) --data $(DATA) -o $@
# The same with one scale per weight tensor (the per-tensor column of the original studies).
$(W)/%.int8pt.onnx: $(W)/%.onnx $(DATA_DEP)
	$(RESOPT) quantize $< --mode int8 --per-tensor --calib-data $(DATA) --num-calib $(call pick,50,320,1000) \
	  --data $(DATA) -o $@
$(W)/%.int8dyn.onnx: $(W)/%.onnx $(DATA_DEP)
	$(RESOPT) quantize $< --mode int8-dynamic --data $(DATA) -o $@
$(W)/%.fp16.onnx: $(W)/%.onnx $(DATA_DEP)
	$(RESOPT) quantize $< --mode fp16 --data $(DATA) -o $@
# Quantization-aware fine-tuning of a checkpoint, exported to Q/DQ ONNX.
QAT_EPOCHS ?= $(call pick,1,2,10)
$(W)/%.qat.onnx: $(W)/%.pt $(DATA_DEP)
	$(RESOPT) quantize $< --mode qat --epochs $(QAT_EPOCHS) --batch-size $(call pick,32,128,128) \
	  --device $(DEVICE) --data $(DATA) -o $@
# k-means weight sharing (256 values per layer) and fixed-point weights (N bits).
$(W)/%.km256.onnx: $(W)/%.pt $(DATA_DEP)
	$(RESOPT) quantize $< --mode kmeans --clusters 256 --data $(DATA) -o $@
define fixed_rule
$(W)/%.fx$(1).onnx: $(W)/%.pt $(DATA_DEP)
	$(RESOPT) quantize $$< --mode fixed --bits $(1) --data $(DATA) -o $$@
endef
$(foreach b,2 3 4 5 6 7 8,$(eval $(call fixed_rule,$(b))))

# ---- results: bench JSON, report, the exact commands, the machine ----------------------------------------
# A study sets BENCHED (the files benched; the first is the baseline of the speed-up column), optionally
# BENCH_EXTRA, REPORTED (more files for the report, e.g. the checkpoints that link the chain), REPORT_EXTRA
# and RESULT_DEPS (other results the study writes, e.g. a sensitivity table).
.DEFAULT_GOAL := all
.PHONY: all
all: $(RESULTS)/report.md

$(RESULTS)/bench.json: $$(BENCHED) $(DATA_DEP)
	mkdir -p $(RESULTS)
	$(RESOPT) bench $(BENCHED) --data $(DATA) $(BENCH_OPTS) $(BENCH_EXTRA) --json > $(W)/bench.json.tmp
	mv $(W)/bench.json.tmp $@

$(RESULTS)/report.md: $(RESULTS)/bench.json $$(REPORTED) $$(RESULT_DEPS)
	$(RESOPT) report $(BENCHED) $(REPORTED) $< -o $(RESULTS) --title "$(TITLE) (SCALE=$(SCALE))" $(REPORT_EXTRA)
	$(if $(filter smoke,$(SCALE)),,$(RESOPT) env --json > $(RESULTS)/machine.json)
	$(if $(filter smoke,$(SCALE)),,COLUMNS=120 $(RESOPT) env > $(RESULTS)/machine.txt 2>&1)
	sed -e 's#$(REPO)/##g' -e 's#$(abspath $(REPO)/..)/shared/#../shared/#g' $(STUDY_LOG) > $(RESULTS)/commands.txt
	printf 'make -C studies %s SCALE=%s\n' $(STUDY) $(SCALE) > $(RESULTS)/command.txt
