"""What happens to a request after it is answered: its trace, usage and cost, metrics, logs and generation records."""
