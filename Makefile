# Two commands set everything up on a fresh Debian machine as root: `make demo` and `make test`.
# Both install what they need (apt packages, a virtual environment, the package) and are idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := softhsm2 opensc socat openssl iproute2 util-linux mount e2fsprogs python3-venv tmux scep certmonger \
	curl dbus-daemon
STATE ?= demo-state
DEVICES ?= 100
# requirements.txt: the runtime lock (the appliance image installs it); requirements-dev.txt: runtime + dev tools.
LOCK := requirements-dev.txt
UV_VERSION := 0.13.9
UV_COMPILE := --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
	--annotation-style line

.PHONY: demo test bench lint deps apt venv clean

demo: deps
	$(VENV)/bin/birthline demo --state $(STATE) --devices $(DEVICES)

test: deps lint
	$(PY) -m pytest -q
	$(PY) bench/chaos.py --kills $(CHAOS_KILLS)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: deps
	$(PY) bench/issue.py
	$(PY) bench/issue.py --controls
	$(PY) bench/console.py
	$(PY) bench/dashboard.py
	$(PY) bench/stations.py serial
	$(PY) bench/stations.py lan
	$(PY) bench/scep.py
	$(PY) bench/est.py
	$(PY) bench/station_failures.py
	$(PY) bench/ocsp.py
	$(PY) bench/ocsp_flood.py --unprotected
	$(PY) bench/cmp_flood.py
	$(PY) bench/scep_flood.py
	$(PY) bench/startup.py
	$(PY) bench/ocsp_fuzz.py
	$(PY) bench/listeners.py --fresh --listeners station,station-tls,va,va-headers,cmp
	$(PY) bench/upstream.py --count 5000 --single-count 1000 --rtt-ms 0,20
	$(PY) bench/upstream.py --upstream birthline --count 3000 --single-count 300 --rtt-ms 0,20
	$(PY) bench/fuzz_csr.py --inputs 1000000
	$(PY) bench/migration.py --rows 200000

deps: apt venv

# Install only what is missing, so a second run touches nothing and needs no network.
apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

# Every dependency (and the setuptools that builds Birthline) comes from the hashed lock, so a rebuild next year
# installs the same bytes; the project itself goes in last without touching the resolver. The venv's own pip (the
# one Python's ensurepip ships) is kept rather than upgraded from the network: it honours --require-hashes.
# -qq: errors only. Where pip's own configuration names index directories that do not exist, pip -q warned once
# per package (56 lines before the demo's output).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --require-hashes -r $(LOCK)
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the hashed locks from pyproject.toml (uv: one universal resolution for every platform running
# Python 3.11+, with the hash of every published file of each pinned version). Run it after changing a dependency
# and commit both files.
.PHONY: lock
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile $(UV_COMPILE) pyproject.toml requirements-build.in -o requirements.txt
	$(VENV)/bin/uv pip compile $(UV_COMPILE) --extra dev pyproject.toml requirements-build.in -o requirements-dev.txt

clean:
	rm -rf $(VENV) $(STATE) .mypy_cache .ruff_cache .pytest_cache

# The fault campaign (docs/reliability.md "Faults"): PKCS#11 faults, disk full, read-only journal, clock steps,
# upstream faults through a proxy. Part of `make test` too; this runs only these.
FAULT_TESTS := tests/appliance/issuance/test_hsm_faults.py tests/appliance/test_wrong_pin_restarts.py \
	tests/hsm/test_refused_pin.py tests/hsm/test_hsm_recovery.py tests/hsm/test_hsm_removal.py \
	tests/appliance/test_silent_faults.py tests/appliance/test_disk_full_kill.py \
	tests/appliance/issuance/test_fault_alarms.py tests/appliance/issuance/test_clock_faults.py \
	tests/appliance/cmp/test_upstream_faults.py tests/appliance/cmp/test_forwarder_alarms.py \
	tests/appliance/test_daemon_hsm_faults.py
.PHONY: faults
faults: deps
	$(PY) -m pytest -q $(FAULT_TESTS)

# perf-front (issue 15): the front ends, the upstream drain, a journal years full, memory (docs/performance.md).
.PHONY: bench-front
bench-front: deps
	$(PY) bench/stations.py lan --open-loop 50x2 --seconds 30
	$(PY) bench/stations.py lan --stations 50 --devices 100 --core-certs 10000
	$(PY) bench/stations.py serial --stations 1,2,8 --pipeline
	$(PY) bench/stations.py serial --stations 1,2,8 --pipeline --start lockstep
	$(PY) bench/upstream.py --count 100000 --single-count 200 --rtt-ms 20
	$(PY) bench/upstream.py --count 20000 --single-count 100 --rtt-ms 20 --one-by-one
	$(PY) bench/journal_growth.py --certs 1000000
	$(PY) bench/stations.py lan --open-loop 100x0.2 --minutes 30 --rss-every 60

# The systemd units, udev rules, sysusers and tmpfiles entries (systemd/install.sh): DESTDIR=DIR installs into an
# image's root filesystem, ENABLE=1 also creates the accounts and enables the units (docs/operations.md).
.PHONY: install-units
install-units:
	sh systemd/install.sh --root "$(or $(DESTDIR),/)" $(if $(filter 1,$(ENABLE)),--enable,)

# The appliance image (docs/operations.md, "Building and testing the image"): not part of `make test` (qemu boots
# take minutes); its own apt packages, installed by the same rule as the others.
IMAGE_APT_PACKAGES := debootstrap qemu-system-x86 e2fsprogs openssl

.PHONY: image image-test image-apt

image-apt:
	$(MAKE) --no-print-directory apt APT_PACKAGES="$(IMAGE_APT_PACKAGES)"

image: deps image-apt
	image/build.sh

image-test: image
	$(PY) image/test.py

# Fuzzing and load (docs/reliability.md): the fuzzing's short budget runs in `make test` (tests/test_fuzz.py);
# these are the long runs. fuzz-atheris installs the optional 'fuzz' extra (atheris, coverage-guided).
.PHONY: fuzz-long fuzz-atheris soak
fuzz-long: deps
	$(PY) bench/fuzz.py --target all --inputs 1000000
fuzz-atheris: deps
	$(PY) -m pip install -q -e '.[fuzz]'
	for t in codec session server csr cmp ocsp config; do \
	  $(PY) bench/fuzz.py --engine atheris --target $$t --inputs 1000000 || exit 1; done
soak: deps
	$(PY) bench/soak.py --minutes 30

# The crash campaign, short version (docs/reliability.md): 40 SIGKILLs of a real daemon, every named crash point
# twice, then the checks; prints "chaos: N kills (...), violations: 0". Several minutes; `make test` runs it
# after pytest (a violation fails `make test`).
# The long version: CHAOS_KILLS=1000 (or bench/chaos.py --kills 1000 --minutes 60).
CHAOS_KILLS ?= 40
.PHONY: chaos
chaos: deps
	$(PY) bench/chaos.py --kills $(CHAOS_KILLS)
