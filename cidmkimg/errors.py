"""The errors of cid-mkimg; ``str()`` of each is the sentence printed after ``cid-mkimg: error:``."""

from __future__ import annotations

from cidcommon.errors import CidError


class MkimgError(CidError):
    """Base class; ``str()`` is the sentence printed after ``cid-mkimg: error:``."""


class UsageError(MkimgError):
    """Bad arguments, an invalid name or version, or a broken catalog: nothing was written."""

    code = "bad_request"


class PackError(MkimgError):
    """tar, compression or writing the image failed; no image file (and no ``.part``) was left."""


class CatalogUpdateError(MkimgError):
    """The image file was written but the catalog could not be updated (it is unchanged)."""


class ReloadError(MkimgError):
    """Image and catalog are written, but cidd did not reload its catalog."""
