"""A chat request from its decoded body to its reply: the phases, the failover loop and the stream relay."""
