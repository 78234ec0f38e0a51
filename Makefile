# Two commands set everything up on a fresh Debian machine as root: `make demo` and `make test`.
# Both install what they need (apt packages, a virtual environment, the package) and are idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := softhsm2 opensc socat openssl iproute2 util-linux mount e2fsprogs python3-venv tmux scep certmonger \
	curl dbus-daemon
STATE ?= demo-state
DEVICES ?= 100

.PHONY: demo test bench lint deps apt venv clean

demo: deps
	$(VENV)/bin/birthline demo --state $(STATE) --devices $(DEVICES)

test: deps lint
	$(PY) -m pytest -q

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

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) $(STATE) .mypy_cache .ruff_cache .pytest_cache

# The crash campaign, short version (docs/reliability.md): 40 SIGKILLs of a real daemon, every named crash point
# twice, then the checks; prints "chaos: N kills (...), violations: 0". Several minutes: not part of `make test`.
# The long version: CHAOS_KILLS=1000 (or bench/chaos.py --kills 1000 --minutes 60).
CHAOS_KILLS ?= 40
.PHONY: chaos
chaos: deps
	$(PY) bench/chaos.py --kills $(CHAOS_KILLS)
