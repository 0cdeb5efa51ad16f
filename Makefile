# cid -- the two commands of the README contract are `make demo` and `make test`.
# Everything they need is installed here: a virtualenv in .venv, and Debian packages
# (through apt-get) only for the tests that drive real components.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
# Debian packages needed by tests that use real components (added by later features).
TEST_DEBS ?= slurmctld slurmd slurm-client munge busybox-static acl zstd e2fsprogs curl systemd openipmi ipmitool \
	grub2-common efibootmgr kexec-tools qemu-system-x86 ipxe-qemu qemu-utils debootstrap cpio fdisk kmod gcc libc6-dev \
	chromium chromium-driver prometheus \
	udpcast nftables iproute2 \
	dpkg-dev build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel \
	python3-argparse-manpage python3-shtab python3-twisted python3-yaml python3-psutil python3-structlog \
	python3-cryptography python3-openssl python3-service-identity python3-zstandard python3-prometheus-client \
	python3-requests python3-pyghmi
PYTEST_ARGS ?=
# Backstop for the whole suite (each test also has pytest-timeout's limit): CI allows 90 minutes.
TEST_TIME_LIMIT ?= 2400

.PHONY: all venv demo test lint sysdeps bench clean install

all: venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory _debs DEBS=python3-venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Install Debian packages when they are missing (root, or through sudo).
_debs:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing; \
	fi

sysdeps:
	@if [ -n "$(strip $(TEST_DEBS))" ]; then $(MAKE) --no-print-directory _debs DEBS="$(TEST_DEBS)"; fi

# Style, the import contracts of docs/architecture.md (.importlinter), no import cycles, and types (mypy
# --strict) of the pure core, the wire and request modules and the clients' protocol code.
MYPY_STRICT ?= cidd/core cidcommon/wire.py cidcommon/errors.py cidcommon/hostlists.py \
	cidcommon/hostport.py cidcommon/requests.py cidcommon/vocabulary.py cidd/client_session.py cidinstall/types.py \
	cidd/agent_messages.py cidcapt/connection.py cidcapt/errors.py cidcapt/progress.py cidcommon/client_config.py

# The Twisted protocol modules of both daemons: typed, checked without --strict (Twisted's own hints are partial).
MYPY_PROTOCOL ?= cidkid/protocol.py cidd/sessions.py cidd/session_hello.py cidd/session_liveness.py \
	cidcommon/twisted_requests.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tools/import_cycles.py
	$(VENV)/bin/mypy --strict --ignore-missing-imports --follow-imports=silent --no-incremental $(MYPY_STRICT)
	$(VENV)/bin/mypy --no-incremental $(MYPY_PROTOCOL)

test: venv sysdeps lint
	timeout --kill-after=30 $(TEST_TIME_LIMIT) $(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) demo/demo.py

bench: venv
	$(PY) bench/control_plane.py

install:
	$(PYTHON) -m pip install .

clean:
	rm -rf $(VENV) .demo build *.egg-info .pytest_cache .ruff_cache

# Debian packages cid-head, cid-node (and python3-hostlist, not in Debian 12) into build/deb/: docs/install.md.
# Builds out of tree with dpkg-buildpackage (debian/, dh-python/pybuild); needs the Build-Depends of debian/control.
.PHONY: deb
deb:
	@$(MAKE) --no-print-directory _debs DEBS="dpkg-dev build-essential debhelper dh-python pybuild-plugin-pyproject \
	  python3-all python3-setuptools python3-wheel python3-argparse-manpage python3-shtab python3-twisted python3-yaml \
	  python3-psutil python3-structlog python3-cryptography python3-openssl python3-service-identity python3-zstandard \
	  python3-prometheus-client python3-requests python3-pip"
	packaging/build-debs.sh build/deb
