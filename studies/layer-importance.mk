# layer-importance: layer sensitivity, then rounds of pruning with per-layer ratios, then PTQ, QAT and fixed point, on ResNet-18 and VGG-16-BN.
#
# The original measured each layer's sensitivity on CIFAR-10, pruned ResNet-18 and VGG-16-BN in rounds with
# per-layer ratios (about 0.1,0.1,0.2,0.2,0.2,0.2,0.3,0.3 over the stages), reporting params / size / MACs /
# top-1 per round, then compared PTQ, QAT and fixed-point weights at 4 to 8 bits. SCALE=cpu: both networks
# at quarter width, trained 10 epochs on 300 train images per class, tested on 100 per class; 3 rounds of
# 2 fine-tuning epochs; the sensitivity scan uses 500 test images.
STUDY := layer-importance
TITLE := layer-importance: sensitivity, pruning rounds, PTQ / QAT / fixed point
TRAIN_PER_CLASS = $(call pick,10,300,0)
TEST_PER_CLASS = $(call pick,10,100,0)
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

WIDTH := $(call pick,0.25,0.25,1)
EPOCHS := $(call pick,1,10,100)
FT_EPOCHS := $(call pick,1,2,20)
BATCH := $(call pick,32,64,128)
ROUNDS := $(call pick,1,1 2 3,1 2 3)
LAST := r$(lastword $(ROUNDS))
NETS := $(call pick,r18,r18 vgg,r18 vgg)
arch = $(if $(filter vgg,$(1)),vgg16-bn-cifar,resnet18-cifar)
# Per block for ResNet-18 (8 basic blocks: the stage pairs); per layer for VGG-16-BN (13 convs in stages of
# 2, 2, 3, 3, 3), the same ramp stage by stage.
RATIOS_r18 := 0.1,0.1,0.2,0.2,0.2,0.2,0.3,0.3
RATIOS_vgg := 0.1,0.1,0.1,0.1,0.2,0.2,0.2,0.3,0.3,0.3,0.3,0.3,0.3
BITS := $(call pick,4,4 5 6 8,4 5 6 8)

ROUND_FILES := $(foreach n,$(NETS),$(ROUNDS:%=$(W)/$(n).r%.pt))
QUANT := $(foreach n,$(NETS),$(W)/$(n).$(LAST).int8.onnx $(W)/$(n).$(LAST).qat.onnx \
  $(BITS:%=$(W)/$(n).$(LAST).fx%.onnx))
SENSITIVITY := $(NETS:%=$(RESULTS)/sensitivity-%.txt)
BENCHED := $(NETS:%=$(W)/%.onnx) $(ROUND_FILES:.pt=.onnx) $(QUANT)
REPORTED := $(NETS:%=$(W)/%.pt) $(ROUND_FILES)
RESULT_DEPS := $(SENSITIVITY)
REPORT_EXTRA := $(foreach n,$(NETS),--baseline $(W)/$(n).onnx)

$(NETS:%=$(W)/%.pt): $(W)/%.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch $(call arch,$*) --width $(WIDTH) --epochs $(EPOCHS) \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
# Each layer's top-1 drop when 25/50/75% of its channels go, and the per-layer ratios it proposes.
$(RESULTS)/sensitivity-%.txt: $(W)/%.pt
	mkdir -p $(RESULTS) && COLUMNS=160 $(RESOPT) prune $< --analyze --sparsity 0.3 \
	  --analyze-images $(call pick,50,500,2000) --data $(DATA) > $@.tmp && mv $@.tmp $@
# Round k prunes round k-1 with the per-layer ratios, then fine-tunes.
$(ROUND_FILES): $(W)/%.pt: $$(W)/$$(call prev_round,$$*).pt
	$(RESOPT) prune $< --method l1-struct --layer-ratios $(RATIOS_$(firstword $(subst ., ,$*))) \
	  --finetune-epochs $(FT_EPOCHS) --lr 0.02 --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
# vgg.r2 -> vgg.r1, vgg.r1 -> vgg
prev_round = $(firstword $(subst ., ,$(1)))$(if $(filter r1,$(lastword $(subst ., ,$(1)))),,.r$(word $(subst r,,$(lastword $(subst ., ,$(1)))),0 1 2 3 4 5 6 7 8 9))
