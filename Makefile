# fiesnap: setup, tests and the VM lab.
#
#   make test    install what is missing (Debian packages, .venv, the two lab kernels and udev),
#                then run the host unit tests, the real-kernel tests in the VM lab, the lab's
#                two-boot self-test, the udev tests (a guest running udevd), the
#                power-cut tests (three boots, then two of an instant rollback) and the
#                five-boot update-lifecycle tests on Debian's kernel (linux-image-amd64, 6.1);
#                on the second kernel series (SECOND_KERNEL, 6.12) the kernel tests marked
#                every_kernel (rollback, online, bad input, dm, kernel differences) and the
#                power-cut boots; in two lanes of guests (~36 min on two cores)
#   make test-kernels   everything real-kernel in `make test` on each of LAB_KERNELS (both
#                series) in turn, the whole suite on each (~30 min per kernel); not part of
#                `make test`
#   make demo    same setup, then the demo script in a lab guest
#   make lab     setup only
#   make unit / kernel-tests / lab-selftest / udev-tests / power-cut-tests / update-boot-tests /
#                instant-boot-tests    one part of `make test`
#   make lab-tests    every real-kernel part of `make test` on one kernel: the one
#                $FIESNAP_LAB_KERNEL names (a Debian kernel package), else linux-image-amd64
#   make kernel-tests-plain   the real-kernel suite with every `fiesnap start` that does not name
#                a store making a plain one (`make test` runs it with the default, free-aware
#                store; the dm-snapshot trap tests and the power cuts run both stores there)
#   make crash-replay   crash consistency: record fiesnap's whole online sequence with dm-log-writes,
#                replay FIESNAP_CRASH_POINTS (default 120; 0 = every point) crash points in a lab
#                guest (tests/kernel/test_crash_replay.py); not part of `make test`, which replays
#                a sample of 12 with the other kernel tests
#   make bench   the benchmarks (benchmarks/README.md) in lab guests, one after the other; not
#                part of `make test`; results in .lab/runs/script-<bench>/results/; installs
#                the benchmark peers lvm2 and fio on the host (the guests see its files)
#
# Knobs: LAB_ARGS (e.g. LAB_ARGS="--shards 2"), PYTEST_ARGS (unit tests),
#        KERNEL_TEST_ARGS (passed to pytest in the guest, e.g. KERNEL_TEST_ARGS="-k smoke -x"),
#        FIESNAP_LAB_KERNEL (environment: the kernel package every lab guest boots, e.g.
#        FIESNAP_LAB_KERNEL=linux-image-6.12-amd64 make kernel-tests), SECOND_KERNEL, LAB_KERNELS.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fiesnap-installed
# Host tools: qemu + busybox for virtme-ng, kmod for depmod/modprobe, the filesystems' tools,
# dmsetup (brings libdevmapper.so.1.02.1, which fiesnap loads, and the dm udev rules the --udev
# guests use), sqlite3 + dosfstools for the tests, libcap2 for the udevadm the lab unpacks into
# .lab/udev (the `udev` package itself is never installed on the host).
APT_PACKAGES := qemu-system-x86 busybox-static kmod xfsprogs e2fsprogs dosfstools sqlite3 dmsetup util-linux libcap2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LAB_ARGS ?=
PYTEST_ARGS ?=
KERNEL_TEST_ARGS ?=
# Lab kernels: Debian packages, fetched into .lab/kernels/<package>. The distribution's own
# kernel is the default; the second series is the newest Debian 12 backports kernel.
SECOND_KERNEL ?= linux-image-6.12-amd64
LAB_KERNELS ?= linux-image-amd64 $(SECOND_KERNEL)
# What every landing also runs on the second kernel: the tests marked every_kernel (rollback
# and the dm-snapshot traps, online start and commit, bad input, the dm layer, the kernel
# differences), and the power-cut boots.
SECOND_KERNEL_TESTS := -m every_kernel
SECOND := env FIESNAP_LAB_KERNEL=$(SECOND_KERNEL)

# The lab's own checks: power cut between two boots on the same disk; udev in a guest.
LAB_SELFTEST := $(VPY) -m tests.lab boots tests/lab/selftest-boots.sh --boots 2 --disks 1 --disk-size 64M
UDEV_TESTS := $(VPY) -m tests.lab kernel-tests --udev --disks 2 -- -m udev
# Setup, online start, power cut, activate, merge, power cut mid-merge, merge again.
POWER_CUT_TESTS := $(VPY) -m tests.lab boots tests/kernel/power_loss.py --boots 3 --disks 3 --timeout 900
# Boot attempts counted, automatic rollback (and a power cut in it), commit at boot-complete,
# the apt hook under a real apt-get run.
UPDATE_BOOT_TESTS := $(VPY) -m tests.lab boots tests/kernel/update_boots.py --boots 5 --disks 4 --timeout 900
# Power cuts during an instant rollback: mid-handover and mid-kernel-merge, resumed by activate.
INSTANT_BOOT_TESTS := $(VPY) -m tests.lab boots tests/kernel/instant_boots.py --boots 2 --disks 4 --timeout 900
# Crash-consistency replay, wide: the lab passes no environment into the guest, so the count
# travels as a pytest option (registered by loading tests/kernel/crash_replay.py as a plugin).
FIESNAP_CRASH_POINTS ?= 120
CRASH_REPLAY := $(VPY) -m tests.lab kernel-tests --shards 1 $(LAB_ARGS) -- -p tests.kernel.crash_replay \
	--crash-points $(FIESNAP_CRASH_POINTS) tests/kernel/test_crash_replay.py

.PHONY: test test-kernels lab-tests demo lab sysdeps bench-sysdeps venv kernel udev unit kernel-tests \
	kernel-tests-plain lab-selftest udev-tests power-cut-tests update-boot-tests instant-boot-tests \
	crash-replay bench report clean-lab

lab: sysdeps venv kernel udev

# $(call apt_install,PACKAGES,WHAT): install those of the Debian PACKAGES that are missing.
define apt_install
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' "$$p" 2>/dev/null | grep -q '^ii' || echo "$$p"; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "make: installing $(2):" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

sysdeps:
	$(call apt_install,$(APT_PACKAGES),Debian packages)

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

kernel: venv
	@$(VPY) -m tests.lab kernel >/dev/null
	@for k in $(LAB_KERNELS); do $(VPY) -m tests.lab kernel --kernel $$k >/dev/null || exit 1; done

udev: venv
	@$(VPY) -m tests.lab udev >/dev/null

unit: venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

kernel-tests: lab
	$(VPY) -m tests.lab kernel-tests $(LAB_ARGS) -- $(KERNEL_TEST_ARGS)

kernel-tests-plain: lab
	$(VPY) -m tests.lab kernel-tests $(LAB_ARGS) -- --store plain $(KERNEL_TEST_ARGS)

lab-selftest: lab
	$(LAB_SELFTEST)

udev-tests: lab
	$(UDEV_TESTS)

power-cut-tests: lab
	$(POWER_CUT_TESTS)

update-boot-tests: lab
	$(UPDATE_BOOT_TESTS)

instant-boot-tests: lab
	$(INSTANT_BOOT_TESTS)

crash-replay: lab
	$(CRASH_REPLAY)

# The real-kernel parts run in two lanes of lab guests, one guest per lane at a time (TCG keeps
# a host core busy per guest): each lane is a list of steps, `step NAME COMMAND...;`, that all
# run whatever the others did. The first lane streams its output; the second lane's is printed
# after it. Every step's exit status is collected; the target fails if any step failed
# (pytest's 5, "no tests", too), and lists those.
# KERNEL_TEST_ARGS narrows the kernel tests alike on every kernel (the second one then runs
# that selection instead of its every_kernel share); a shard it leaves empty is no failure.
KTESTS = $(VPY) -m tests.lab kernel-tests $(LAB_ARGS) $(if $(KERNEL_TEST_ARGS),--allow-no-pass)
SECOND_SHARE = $(or $(KERNEL_TEST_ARGS),$(SECOND_KERNEL_TESTS))
STEPS = steps=$$(mktemp); step() { local name=$$1; shift; "$$@"; echo "$$? $$name" >>"$$steps"; }

# $(call lanes,FIRST,SECOND): run the steps FIRST and SECOND side by side. ^C or a kill stops
# both lanes (a background lane would ignore ^C); a lane that dies counts as a failed step.
define lanes
	lane2=$$(mktemp); \
	{ trap 'exit 130' INT TERM; $(2) } >"$$lane2" 2>&1 & pid2=$$!; \
	trap 'kill $$pid2 2>/dev/null; wait $$pid2; cat "$$lane2"; rm -f "$$lane2" "$$steps"; exit 130' INT TERM; \
	$(1) \
	wait $$pid2 || echo "$$? the second lane" >>"$$steps"; trap - INT TERM; \
	echo "----- the second lane:"; cat "$$lane2"; rm -f "$$lane2";
endef

# $(call verdict,TARGET): exit 1 naming every step that failed.
define verdict
	failed=$$(awk '$$1 != 0' "$$steps"); rm -f "$$steps"; \
	if [ -n "$$failed" ]; then echo "make $(1): FAILED:"; echo "$$failed" | sed 's/^/  exit /'; exit 1; fi; \
	echo "make $(1): every part passed"
endef

# `make test`: each lane runs one half of the default kernel's kernel tests, then one half of
# the second kernel's share; then the boot tests, the second kernel's power cuts among them,
# split so that both lanes end about together (~34 min each on two cores).
TEST_LANE1 = step "kernel tests, shard 1/2" $(KTESTS) --shard 1/2 -- $(KERNEL_TEST_ARGS); \
	step "$(SECOND_KERNEL) kernel tests, shard 1/2" $(SECOND) $(KTESTS) --shard 1/2 -- $(SECOND_SHARE); \
	step "lab self-test" $(LAB_SELFTEST); \
	step "instant-rollback power-cut tests" $(INSTANT_BOOT_TESTS);
TEST_LANE2 = step "kernel tests, shard 2/2" $(KTESTS) --shard 2/2 -- $(KERNEL_TEST_ARGS); \
	step "$(SECOND_KERNEL) kernel tests, shard 2/2" $(SECOND) $(KTESTS) --shard 2/2 -- $(SECOND_SHARE); \
	step "udev tests" $(UDEV_TESTS); \
	step "update-lifecycle tests" $(UPDATE_BOOT_TESTS); \
	step "power-cut tests" $(POWER_CUT_TESTS); \
	step "$(SECOND_KERNEL) power-cut tests" $(SECOND) $(POWER_CUT_TESTS);

test: lab
	@$(STEPS); \
	step "unit tests" $(VPY) -m pytest tests/unit $(PYTEST_ARGS); \
	$(call lanes,$(TEST_LANE1),$(TEST_LANE2)) \
	$(call verdict,test)

# Every real-kernel part of `make test` on one kernel ($FIESNAP_LAB_KERNEL, else the default).
LAB_LANE1 = step "kernel tests, shard 1/2" $(KTESTS) --shard 1/2 -- $(KERNEL_TEST_ARGS); \
	step "lab self-test" $(LAB_SELFTEST); \
	step "udev tests" $(UDEV_TESTS); \
	step "power-cut tests" $(POWER_CUT_TESTS); \
	step "instant-rollback power-cut tests" $(INSTANT_BOOT_TESTS);
LAB_LANE2 = step "kernel tests, shard 2/2" $(KTESTS) --shard 2/2 -- $(KERNEL_TEST_ARGS); \
	step "update-lifecycle tests" $(UPDATE_BOOT_TESTS);

lab-tests: lab
	@$(STEPS); \
	$(call lanes,$(LAB_LANE1),$(LAB_LANE2)) \
	$(call verdict,lab-tests on $${FIESNAP_LAB_KERNEL:-linux-image-amd64})

# The whole real-kernel suite on every kernel in LAB_KERNELS, one kernel after the other.
test-kernels: lab
	@rc=0; failed=; \
	for k in $(LAB_KERNELS); do \
	  echo "===== make lab-tests on $$k"; \
	  FIESNAP_LAB_KERNEL=$$k $(MAKE) --no-print-directory lab-tests || { rc=1; failed="$$failed $$k"; }; \
	done; \
	if [ $$rc != 0 ]; then echo "make test-kernels: FAILED on$$failed"; exit 1; fi; \
	echo "make test-kernels: passed on $(LAB_KERNELS)"

# Benchmarks report numbers, they do not pass or fail on speed (a run fails only if a script did).
# Benchmark peers, only for `make bench` (never used by fiesnap itself): LVM's snapshot merge
# and fio's replay of a rollback's I/O pattern run in the lab guest, which sees the host's files.
BENCH_APT_PACKAGES := lvm2 fio

bench-sysdeps:
	$(call apt_install,$(BENCH_APT_PACKAGES),benchmark peers)

bench: lab bench-sysdeps
	@rc=0; \
	for b in monitor_bench hash_bench; do \
	  $(VPY) -m tests.lab script benchmarks/$$b.py --disks 1 --disk-size 3G --timeout 1500 || rc=$$?; \
	done; \
	$(VPY) -m tests.lab script benchmarks/bow_bench.py --disks 3 --disk-size 1G --timeout 1500 || rc=$$?; \
	$(VPY) -m tests.lab script benchmarks/free_aware_bench.py --disks 1 --disk-size 86G --timeout 1800 || rc=$$?; \
	$(VPY) -m tests.lab script benchmarks/instant_bench.py --disks 1 --disk-size 2G --timeout 1800 || rc=$$?; \
	$(VPY) -m tests.lab script benchmarks/instant_bench.py --disks 1 --disk-size 2G --timeout 2400 \
	  -- --pattern scatter --overwrite 48M || rc=$$?; \
	$(VPY) -m tests.lab script benchmarks/startup_bench.py --disks 1 --disk-size 512M --timeout 900 || rc=$$?; \
	$(VPY) -m tests.lab script benchmarks/merge_bench.py --disks 2 --disk-size 2G --timeout 2400 || rc=$$?; \
	for k in $(LAB_KERNELS); do \
	  FIESNAP_LAB_KERNEL=$$k $(VPY) -m tests.lab script benchmarks/flush_bench.py --disks 1 --disk-size 2G \
	    --timeout 900 || rc=$$?; \
	done; \
	exit $$rc

# The A/B report (benchmarks/REPORT.md, benchmarks/results/): every workload against every peer,
# in two lab guests side by side (the peers of one workload always share a guest), then rendered
# on the host with matplotlib (the `report` extra). Not part of `make test`.
REPORT_LANE1 := package_upgrade,database,logs,source_tree
REPORT_LANE2 := rewrite_in_place,new_files,fio
REPORT_ARGS :=
REPORT_GUEST = $(VPY) -m tests.lab script benchmarks/report_bench.py --disks 4 --disk-size 3G --timeout 7200

report: lab bench-sysdeps
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test,report]'
	@rm -rf .lab/runs/script-report_bench*-lane*; \
	$(REPORT_GUEST) --tag lane1 -- --workloads $(REPORT_LANE1) $(REPORT_ARGS) > .lab/report-lane1.log 2>&1 & p1=$$!; \
	$(REPORT_GUEST) --tag lane2 -- --workloads $(REPORT_LANE2) $(REPORT_ARGS) > .lab/report-lane2.log 2>&1 & p2=$$!; \
	trap 'kill $$p1 $$p2 2>/dev/null; exit 130' INT TERM; \
	echo "make report: two guests running; their logs: .lab/report-lane1.log .lab/report-lane2.log"; \
	rc=0; wait $$p1 || rc=1; wait $$p2 || rc=1; \
	tail -n 4 .lab/report-lane1.log .lab/report-lane2.log; \
	if [ $$rc != 0 ]; then \
	  echo "make report: a guest failed; benchmarks/ is unchanged (logs above, results in .lab/runs/script-report_bench*-lane*/results/)"; \
	  exit 1; \
	fi; \
	mkdir -p benchmarks/results && rm -f benchmarks/results/*.json; \
	for f in .lab/runs/script-report_bench*-lane*/results/*.json; do cp "$$f" benchmarks/results/; done; \
	$(VPY) benchmarks/render_report.py

demo: lab
	$(VPY) -m tests.lab script tests/lab/demo.sh $(LAB_ARGS)

clean-lab:
	rm -rf .lab/runs
