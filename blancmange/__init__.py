"""blancmange: the cid installer builder (kernel + initramfs from Debian packages). See docs/blancmange.md."""
