"""The control plane's state: keys made at runtime and the spend ledger.

Both live in the same store as the limits: Redis when ``[redis]`` is set,
else SQLite files under ``[admin] data_dir`` (or process memory when no admin
key is configured), so every replica and worker reads the same keys and the
same spend.
"""
