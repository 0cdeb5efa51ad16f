"""cidd: the cid head-node daemon."""
