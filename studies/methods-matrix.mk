# methods-matrix: ResNet-50 and ResNet-18, every compression method side by side (pruning, quantization, distillation).
#
# Per model: structured L1 pruning one-shot vs iterative at 50/75/90% of the channels, unstructured L1
# one-shot vs iterative at 50/75/90% of the weights, 2:4 sparsity, post-training INT8 per-tensor and
# per-channel, QAT, k-means (256 shared values per layer); and ResNet-50 -> ResNet-18 distillation into a
# pretrained and a from-scratch student. Columns: top-1, top-5, size, params, non-zero params, CPU latency.
# SCALE=full is the original: ImageNet (IMAGENET=/path with train/ and val-as-test/), full widths,
# torchvision-pretrained students (needs network once), TensorRT FP32/FP16 rows on a GPU.
# SCALE=cpu: the ImageNet-stem ResNet-18/50 at quarter width on 32x32 CIFAR-10 (300 train / 100 test images per
# class, 6 epochs): the methods' relative effect, not ImageNet accuracy; ResNet-50 gets the pruning matrix at
# 75% only (the 2-core budget), ResNet-18 at 50/75/90%; one-shot pruning fine-tunes as many epochs as the
# iterative schedule does in all; the "pretrained" student is the ResNet-18 trained here; TensorRT needs a
# GPU, so its rows are absent.
STUDY := methods-matrix
TITLE := methods-matrix: ResNet-50 and ResNet-18, every method
TRAIN_PER_CLASS = $(call pick,10,200,0)
TEST_PER_CLASS = $(call pick,10,100,0)
NEEDS_IMAGENET := 1
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

WIDTH := $(call pick,0.25,0.25,1)
EPOCHS := $(call pick,1,6,90)
FT_EPOCHS := $(call pick,1,2,10)
STEPS := $(call pick,2,2,5)
BATCH := $(call pick,32,64,256)
PRETRAINED := $(if $(filter full,$(SCALE)),--pretrained,)
MODELS := $(call pick,r18,r18 r50,r18 r50)
LEVELS := 50 75 90
# smoke runs each kind of step once (on ResNet-18): seconds per step, so the pipeline cannot rot.
COMPRESSED := $(call pick,r18,$(MODELS),$(MODELS))
arch = $(if $(filter r50,$(1)),resnet50,resnet18)

# For each model: sNN structured one-shot, siNN structured iterative, uNN unstructured one-shot, uiNN unstructured
# iterative, s24 2:4.
ALL_VARIANTS := $(foreach l,$(LEVELS),s$(l) si$(l) u$(l) ui$(l)) s24
VARIANTS_r18 := $(call pick,si50 ui50 s24,$(ALL_VARIANTS),$(ALL_VARIANTS))
VARIANTS_r50 := $(call pick,,s75 si75 u75 ui75 s24,$(ALL_VARIANTS))
PRUNED := $(foreach m,$(COMPRESSED),$(VARIANTS_$(m):%=$(W)/$(m).%.pt))
QUANT := $(foreach m,$(COMPRESSED),$(call pick,,$(W)/$(m).int8.onnx,$(W)/$(m).int8.onnx) $(W)/$(m).int8pt.onnx \
  $(W)/$(m).qat.onnx $(W)/$(m).km256.onnx)
# smoke leaves distillation to kd-prune-quant (from scratch) and converged-cifar (into a checkpoint).
DISTILLED := $(call pick,,$(W)/r18.kd.pt $(W)/r18.kdscratch.pt,$(W)/r18.kd.pt $(W)/r18.kdscratch.pt)
BENCHED := $(foreach m,$(MODELS),$(W)/$(m).onnx) $(PRUNED:.pt=.onnx) $(QUANT) $(DISTILLED:.pt=.onnx)
REPORTED := $(foreach m,$(MODELS),$(W)/$(m).pt) $(PRUNED) $(DISTILLED)
REPORT_EXTRA := $(foreach m,$(MODELS),--baseline $(W)/$(m).onnx)

$(foreach m,$(MODELS),$(W)/$(m).pt): $(W)/%.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch $(call arch,$*) --width $(WIDTH) $(PRETRAINED) --epochs $(EPOCHS) \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@

# $(call prune_opts,VARIANT): the prune options of a variant name.
prune_opts = $(strip $(if $(filter s24,$(1)),--method 2:4,\
  $(if $(filter u%,$(1)),--method l1-unstruct,--method l1-struct) \
  $(if $(filter si% ui%,$(1)),--iterative --steps $(STEPS)) \
  --sparsity 0.$(patsubst s%,%,$(patsubst si%,%,$(patsubst u%,%,$(patsubst ui%,%,$(1)))))))
# Iterative pruning fine-tunes FT_IT epochs after each of its STEPS steps; one-shot FT_EPOCHS, as many in all
# (STEPS x FT_IT = FT_EPOCHS: 2 x 1 = 2 at SCALE=cpu, 5 x 2 = 10 at full).
FT_IT := $(call pick,1,1,2)
$(PRUNED): $(W)/%.pt: $$(W)/$$(firstword $$(subst ., ,$$*)).pt
	$(RESOPT) prune $< $(call prune_opts,$(lastword $(subst ., ,$*))) \
	  --finetune-epochs $(if $(findstring i,$(lastword $(subst ., ,$*))),$(FT_IT),$(FT_EPOCHS)) --lr 0.01 \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@

# ResNet-50 -> ResNet-18 (alpha 0.5, T 4): into the trained (pretrained at full) ResNet-18, and from scratch.
$(W)/r18.kd.pt: $(W)/r50.pt $(W)/r18.pt
	$(RESOPT) distill --teacher $< --student $(W)/r18.pt --alpha 0.5 --temperature 4 --epochs $(FT_EPOCHS) \
	  --lr 0.01 --warmup-epochs 0 --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
$(W)/r18.kdscratch.pt: $(W)/r50.pt
	$(RESOPT) distill --teacher $< --student resnet18 --width $(WIDTH) --alpha 0.5 --temperature 4 \
	  --epochs $(EPOCHS) --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
