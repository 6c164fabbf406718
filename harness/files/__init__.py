"""Files: atomic writes, content hashes, where data, caches and outputs live."""
