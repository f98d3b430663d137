"""The HTTP surface: the ASGI entry with the chat fast path, the litestar routes, and the local backend process."""
