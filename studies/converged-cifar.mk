# converged-cifar: resopt's headline on converged models: published ResNet-20/56 imported, adapted, pruned to 70/50/35% MACs, INT8, on ORT and OpenVINO.
#
# The published ResNet-20 and ResNet-56 (akamaster/pytorch_resnet_cifar10, BSD-2-Clause) are imported, adapted to the JPEG compression of the
# shared CIFAR-10 by a short self-distilled fine-tune on its train split, pruned to about 70/50/35% of their
# MACs (global ranking, widths rounded to 8) with fine-tuning distilled from the adapted parent, quantized to
# INT8, and all benched in one run on onnxruntime and OpenVINO on the whole test split.
#
# SCALE=cpu scales down only the fine-tuning: 1,000 train images per class (of 5,000), 1 adaptation epoch and
# 2 epochs per pruned model; the test split stays whole (10,000 images), so the accuracy drops are measured
# to about 0.1 point of paired noise. SCALE=full fine-tunes on all 50,000 images for 10 and 30 epochs.
STUDY := converged-cifar
TITLE := converged-cifar: published ResNet-20/56, adapted, pruned and INT8
TRAIN_PER_CLASS = $(call pick,20,1000,0)
TEST_PER_CLASS = $(call pick,10,0,0)
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

# smoke runs one model and one level: every rule once, in seconds per step.
MODELS := $(call pick,r20,r20 r56,r20 r56)
LEVELS := $(call pick,50,70 50 35,70 50 35)
ADAPT_EPOCHS := $(call pick,1,1,10)
FT_EPOCHS := $(call pick,1,2,30)
BATCH := $(call pick,32,128,128)

IMPORTED := $(MODELS:%=$(W)/%.import.pt)
ADAPTED := $(MODELS:%=$(W)/%.pt)
PRUNED := $(foreach m,$(MODELS),$(foreach l,$(LEVELS),$(W)/$(m).m$(l).pt))
FP32 := $(foreach m,$(MODELS),$(W)/$(m).onnx $(foreach l,$(LEVELS),$(W)/$(m).m$(l).onnx))
INT8 := $(FP32:.onnx=.int8.onnx)
# The baseline of the speed-up column: ResNet-56 in FP32 on onnxruntime.
BASE := $(W)/$(lastword $(MODELS)).onnx
BENCHED := $(BASE) $(filter-out $(BASE),$(FP32)) $(INT8) $(MODELS:%=$(W)/%.import.onnx)
BENCH_EXTRA := --runtime ort,openvino
# The checkpoints link each ONNX file to its chain in the report; each chain is compared with its adapted FP32
# model on onnxruntime.
REPORTED := $(IMPORTED) $(ADAPTED) $(PRUNED)
REPORT_EXTRA := $(foreach m,$(MODELS),--baseline $(W)/$(m).onnx)

$(W)/r20.import.pt: $(R20_SRC) $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) import $< $(NORM) --data $(DATA) -o $@
$(W)/r56.import.pt: $(R56_SRC) $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) import $< $(NORM) --data $(DATA) -o $@

# Adapt to the JPEG data: fine-tune on its train split, distilled from the imported model itself (alpha 0.5
# keeps the model close to what it knew while the label term adapts it).
$(ADAPTED): $(W)/%.pt: $(W)/%.import.pt
	$(RESOPT) distill --teacher $< --student $< --alpha 0.5 --epochs $(ADAPT_EPOCHS) --lr 0.01 \
	  --warmup-epochs 0 --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@

# rNN.mLL.pt: rNN.pt pruned to LL% of its MACs.
$(PRUNED): $(W)/%.pt: $$(W)/$$(firstword $$(subst ., ,$$*)).pt
	$(RESOPT) prune $< --target-macs 0.$(subst m,,$(lastword $(subst ., ,$*))) --global --round-to 8 \
	  --teacher $< --finetune-epochs $(FT_EPOCHS) --lr 0.02 --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@

