"""Code shared by cidd, cidkid and cidcapt: wire framing, errors, hostlists, tokens and paths.

Nothing here imports the Twisted reactor or opens sockets, so the blocking client stays fast to start.
"""

__version__ = "0.1.0"
