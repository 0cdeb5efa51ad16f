"""cidcapt: the blocking client that asks cidd to put a job's nodes into an image and waits for them.

Called from a batch scheduler's prolog (``cidcapt -j JOB -n HOSTLIST -i IMAGE``), it returns when every node
runs the image, and says through its exit code (see ``cidcapt.exit_codes``) what happened otherwise. It also shows
cidd's view of the nodes (``--status``) and of the captures (``--captures``).

A plain blocking-socket client: nothing here imports Twisted, so it starts fast.
"""

__version__ = "0.1.0"
