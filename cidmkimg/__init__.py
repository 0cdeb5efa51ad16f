"""cidmkimg: ``cid-mkimg``, which packs a root file system into an image file and its catalog entry.

Runs on the head node or a build host. ``pack`` writes the ``.tar.zst`` (multithreaded zstd), ``main`` is the
command line. Uses cidcatalog for the entry and cidcapt's client to ask cidd to reload.
"""
