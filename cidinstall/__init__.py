"""cidinstall: the streaming installer that writes an image onto a node's disk.

Runs on the node, inside the installer initramfs, driven by the agent (``cidkid``): HTTP with resume
(``download``) → sha256 → decompress (``decompress``) → tar into the target (``stream``), onto a directory or a
freshly made file system (``target``), with the image marker and the unfinished-install flag (``marker``).
``types`` holds the request and result the agent passes in. Imports neither cidd, cidcapt, cidkid nor cidsim.
"""
