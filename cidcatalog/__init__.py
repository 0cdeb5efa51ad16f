"""cidcatalog: the image catalog (``images.yaml``), shared by cidd (serving) and cid-mkimg (adding entries).

``catalog`` parses and renders entries (pure: no reactor, no socket); ``edit`` updates one entry of the file in
place, under a lock, with fsync. Imports nothing but cidcommon.
"""
