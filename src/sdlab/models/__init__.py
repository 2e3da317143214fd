"""The networks: plain torch.nn, one per file, attribute names equal to the
original single-file checkpoint keys (so loading is a prefix strip)."""
