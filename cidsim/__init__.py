"""cidsim: simulators and test doubles, for the test suite, the benchmarks and ``make demo`` only.

``fleet`` is a simulated node fleet (fake disks, reboots and installs, real agent sessions), ``bmc`` simulated
IPMI BMCs, ``main`` the ``cid-simfleet`` command, ``agent_doubles`` and ``fake_cidd`` doubles for unit tests.
No product package imports cidsim (``make lint`` checks it) and blancmange never copies it into an installer.
"""
