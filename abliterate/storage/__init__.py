"""Files on disk, below every stage: the cache folder, atomic output folders, sha256 hashing, streamed
safetensors shards and the safetensors tensor format. Knows nothing about models.
"""
