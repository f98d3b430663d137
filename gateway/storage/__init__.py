"""Redis access: the pipelined RESP client, batching across requests, and clients from a URL."""
