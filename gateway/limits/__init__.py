"""Gateway keys, and the rate, concurrency and budget limits on keys and upstreams."""
