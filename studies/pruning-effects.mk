# pruning-effects: L1 filter vs soft filter vs unstructured pruning at 30/60/90%, on a plain, a depthwise-separable and an SE ResNet.
#
# The original pruned a ResNet-50 on CIFAR-100 and its depthwise-separable and squeeze-and-excitation
# variants, and found that pruning the depthwise variant hurt most. SCALE=cpu: ResNet-20 and its -ds and
# -se variants trained from scratch on CIFAR-10 (CIFAR-100 is not on this machine; the shared data set is
# CIFAR-10) for 10 epochs on 400 train images per class, tested on 100 per class; each pruned model is
# fine-tuned 2 epochs. Columns: params, MACs, latency, peak memory, top-1. SCALE=full: ResNet-56 variants
# on CIFAR-100 (DATA100=cifar100, downloaded once into $RESOPT_DATA on a machine with network).
STUDY := pruning-effects
TITLE := pruning-effects: L1 / SFP / unstructured on plain, depthwise and SE ResNets
TRAIN_PER_CLASS = $(call pick,10,400,0)
TEST_PER_CLASS = $(call pick,10,100,0)
DATA100 ?= cifar100
FULL_DATA = $(DATA100)
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

DEPTH := $(call pick,20,20,56)
EPOCHS := $(call pick,1,10,160)
FT_EPOCHS := $(call pick,1,2,20)
BATCH := $(call pick,32,128,128)
# plain, depthwise-separable, squeeze-and-excitation
BASES := $(call pick,ds,plain ds se,plain ds se)
arch = resnet$(DEPTH)$(if $(filter plain,$(1)),,-$(1))
# smoke runs soft filter pruning only: the other two methods run in cifar10-resnet18 and methods-matrix.
METHODS := $(call pick,sfp,l1 sfp un,l1 sfp un)
LEVELS := $(call pick,60,30 60 90,30 60 90)
method_opt = $(if $(filter l1,$(1)),l1-struct,$(if $(filter sfp,$(1)),sfp,l1-unstruct))

PRUNED := $(foreach b,$(BASES),$(foreach m,$(METHODS),$(foreach l,$(LEVELS),$(W)/$(b).$(m)-$(l).pt)))
BENCHED := $(BASES:%=$(W)/%.onnx) $(PRUNED:.pt=.onnx)
REPORTED := $(BASES:%=$(W)/%.pt) $(PRUNED)
REPORT_EXTRA := $(foreach b,$(BASES),--baseline $(W)/$(b).onnx)

$(BASES:%=$(W)/%.pt): $(W)/%.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch $(call arch,$*) --epochs $(EPOCHS) --batch-size $(BATCH) \
	  --data $(DATA) $(TRAIN_OPTS) -o $@
# BASE.METHOD-LL.pt: LL% pruned with METHOD (l1: L1 filter pruning, sfp: soft filter pruning, un: unstructured).
$(PRUNED): $(W)/%.pt: $$(W)/$$(firstword $$(subst ., ,$$*)).pt
	$(RESOPT) prune $< --method $(call method_opt,$(firstword $(subst -, ,$(lastword $(subst ., ,$*))))) \
	  --sparsity 0.$(lastword $(subst -, ,$*)) --finetune-epochs $(FT_EPOCHS) --lr 0.02 \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
