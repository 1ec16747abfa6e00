# fiesnap: setup, tests and the VM lab.
#
#   make test    install what is missing (Debian packages, .venv, lab kernel), then run the
#                host unit tests and the real-kernel tests in the VM lab
#   make demo    same setup, then the demo script in a lab guest
#   make lab     setup only
#   make unit / make kernel-tests    one half of `make test` (after setup)
#
# Knobs: LAB_ARGS (e.g. LAB_ARGS="--shards 2"), PYTEST_ARGS (unit tests),
#        KERNEL_TEST_ARGS (passed to pytest in the guest, e.g. KERNEL_TEST_ARGS="-k smoke -x").

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fiesnap-installed
# Host tools: qemu + busybox for virtme-ng, kmod for depmod/modprobe, the filesystems' tools,
# dmsetup (brings libdevmapper.so.1.02.1, which fiesnap loads), sqlite3 + dosfstools for the tests.
APT_PACKAGES := qemu-system-x86 busybox-static kmod xfsprogs e2fsprogs dosfstools sqlite3 dmsetup util-linux
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LAB_ARGS ?=
PYTEST_ARGS ?=
KERNEL_TEST_ARGS ?=

.PHONY: test demo lab sysdeps venv kernel unit kernel-tests clean-lab

lab: sysdeps venv kernel

sysdeps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' "$$p" 2>/dev/null | grep -q '^ii' || echo "$$p"; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

kernel: venv
	@$(VPY) -m tests.lab kernel >/dev/null

unit: venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

kernel-tests: lab
	$(VPY) -m tests.lab kernel-tests $(LAB_ARGS) -- $(KERNEL_TEST_ARGS)

# Both halves always run; the target fails if either did (pytest's 5, "no tests", too).
test: lab
	@unit=0; kern=0; \
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS) || unit=$$?; \
	$(VPY) -m tests.lab kernel-tests $(LAB_ARGS) -- $(KERNEL_TEST_ARGS) || kern=$$?; \
	if [ $$unit != 0 ] || [ $$kern != 0 ]; then \
	  echo "make test: FAILED (unit tests exit $$unit, kernel tests exit $$kern)"; exit 1; \
	fi

demo: lab
	$(VPY) -m tests.lab script tests/lab/demo.sh $(LAB_ARGS)

clean-lab:
	rm -rf .lab/runs
