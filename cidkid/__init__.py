"""cidkid: the node agent of cid.

It connects to cidd and stays connected, says who it is and which image it runs, sends heartbeats with health
figures, and carries out cidd's commands (reboot, install). ``cidkid.platform`` is the seam to the hardware,
``cidsim.fleet`` a simulated fleet for scale tests, ``cidkid.main`` the command line.
"""

from cidcommon import __version__

AGENT_VERSION = f"cidkid {__version__}"

__all__ = ["AGENT_VERSION", "__version__"]
