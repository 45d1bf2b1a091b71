# cifar10-resnet18: ResNet-18 (CIFAR stem) baseline, structured pruning sweep, INT8/FP16, pruning + INT8; ResNet-20 reference.
#
# The original trained a full-width ResNet-18 to 92.02% (42.66 MB), pruned 60% of its channels, and
# quantized it to INT8 with TensorRT (2.96 MB, 89.03%); its ResNet-20 reached 92.11% at 1.05 MB.
# SCALE=cpu: ResNet-18 at width 0.25 (0.70 M params; the full width trains at 70 img/s on 2 cores), trained
# for 10 epochs on 500 images per class and tested on 200 per class; the sweep fine-tunes 3 epochs per level;
# ResNet-20 is the published converged model, imported (not trained here). FP32 and AMP training differ only
# on a GPU (AMP is CUDA-only), so the AMP baseline runs at SCALE=full. Latency is onnxruntime on the CPU
# (the original's TensorRT latency needs a GPU: `resopt build` at SCALE=full).
STUDY := cifar10-resnet18
TITLE := cifar10-resnet18: ResNet-18 pruning sweep + INT8, ResNet-20 reference
TRAIN_PER_CLASS = $(call pick,20,500,0)
TEST_PER_CLASS = $(call pick,10,200,0)
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

WIDTH := $(call pick,0.25,0.25,1)
EPOCHS := $(call pick,1,10,200)
FT_EPOCHS := $(call pick,1,3,40)
BATCH := $(call pick,32,128,128)
# Fraction of each layer's channels removed.
LEVELS := $(call pick,60,30 45 60 75 90,30 45 60 75 90)

PRUNED := $(LEVELS:%=$(W)/r18.p%.pt)
# smoke leaves out the FP16 copy and the ResNet-20's INT8 (their rules run in kd-prune-quant and here on r18).
BENCHED := $(W)/r18.onnx $(W)/r18.int8.onnx $(call pick,,$(W)/r18.fp16.onnx,$(W)/r18.fp16.onnx) $(PRUNED:.pt=.onnx) \
  $(PRUNED:.pt=.int8.onnx) $(W)/r20.onnx $(call pick,,$(W)/r20.int8.onnx,$(W)/r20.int8.onnx) \
  $(if $(filter full,$(SCALE)),$(W)/r18.amp.onnx)
REPORTED := $(W)/r18.pt $(PRUNED) $(W)/r20.pt
REPORT_EXTRA := --baseline $(W)/r18.onnx --baseline $(W)/r20.onnx

$(W)/r18.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch resnet18-cifar --width $(WIDTH) --epochs $(EPOCHS) --batch-size $(BATCH) \
	  --no-amp --data $(DATA) $(TRAIN_OPTS) -o $@
# Mixed precision (bf16/fp16 autocast on CUDA): the original's second baseline.
$(W)/r18.amp.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch resnet18-cifar --width $(WIDTH) --epochs $(EPOCHS) --batch-size $(BATCH) \
	  --amp --data $(DATA) $(TRAIN_OPTS) -o $@
# r18.pNN.pt: NN% of each layer's channels removed (L1 norm), then fine-tuned.
$(PRUNED): $(W)/r18.p%.pt: $(W)/r18.pt
	$(RESOPT) prune $< --method l1-struct --sparsity 0.$* --finetune-epochs $(FT_EPOCHS) --lr 0.02 \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
# The small reference: the published converged ResNet-20 (models/, BSD-2-Clause), imported.
$(W)/r20.pt: $(R20_SRC) $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) import $< $(NORM) --data $(DATA) -o $@
