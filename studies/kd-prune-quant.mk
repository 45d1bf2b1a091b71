# kd-prune-quant: teacher ResNet-50 -> distilled ResNet-18 -> L2 structured pruning 5% -> static/dynamic INT8 and FP16.
#
# The original distilled an ImageNet ResNet-50 into a ResNet-18 (alpha 0.5, T 4), removed 5% of every layer's
# channels by L2 norm with fine-tuning (36.16 MB), and quantized it: static INT8 9.06 MB (3.95x), FP16
# 18.11 MB. SCALE=cpu: a half-width ResNet-50 teacher and a full-width ResNet-18 student (11.2 M params,
# so the sizes are comparable with the original's) on 32x32 CIFAR-10, 300 train / 100 test images per
# class, 6 epochs each: the sizes and their ratios are the point; the accuracies are of minutes-trained
# models. SCALE=full: ImageNet (IMAGENET=/path), full widths, 90 epochs, on a GPU.
STUDY := kd-prune-quant
TITLE := kd-prune-quant: ResNet-50 -> ResNet-18 -> 5% L2 pruning -> INT8/FP16
TRAIN_PER_CLASS = $(call pick,10,300,0)
TEST_PER_CLASS = $(call pick,10,100,0)
NEEDS_IMAGENET := 1
include $(dir $(lastword $(MAKEFILE_LIST)))common.mk

TEACHER_WIDTH := $(call pick,0.25,0.5,1)
STUDENT_WIDTH := $(call pick,0.25,1,1)
EPOCHS := $(call pick,1,6,90)
FT_EPOCHS := $(call pick,1,2,10)
BATCH := $(call pick,32,64,256)

# smoke leaves out the teacher's export and the second INT8 (the same rules run on the other files).
BENCHED := $(W)/r18.kd.onnx $(W)/r18.kd.p05.onnx $(W)/r18.kd.p05.int8.onnx $(W)/r18.kd.p05.int8dyn.onnx \
  $(W)/r18.kd.p05.fp16.onnx $(call pick,,$(W)/r50.onnx,$(W)/r50.onnx) $(W)/r18.kd.p05r8.onnx \
  $(call pick,,$(W)/r18.kd.p05r8.int8.onnx,$(W)/r18.kd.p05r8.int8.onnx)
REPORTED := $(W)/r50.pt $(W)/r18.kd.pt $(W)/r18.kd.p05.pt $(W)/r18.kd.p05r8.pt
REPORT_EXTRA := --baseline $(W)/r18.kd.onnx

$(W)/r50.pt: $(DATA_DEP)
	mkdir -p $(W) && $(RESOPT) train --arch resnet50 --width $(TEACHER_WIDTH) --epochs $(EPOCHS) \
	  --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
$(W)/r18.kd.pt: $(W)/r50.pt
	$(RESOPT) distill --teacher $< --student resnet18 --width $(STUDENT_WIDTH) --alpha 0.5 --temperature 4 \
	  --epochs $(EPOCHS) --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
# 5% of every layer's channels by L2 norm, fine-tuned; and the same with the widths rounded to multiples of 8
# (the original's exact recipe leaves widths like 61 and 486, off onnxruntime's fast convolution kernels).
$(W)/r18.kd.p05.pt $(W)/r18.kd.p05r8.pt: $(W)/r18.kd.p05%.pt: $(W)/r18.kd.pt
	$(RESOPT) prune $< --method l2-struct --sparsity 0.05 $(if $*,--round-to 8) --finetune-epochs $(FT_EPOCHS) \
	  --lr 0.01 --batch-size $(BATCH) --data $(DATA) $(TRAIN_OPTS) -o $@
