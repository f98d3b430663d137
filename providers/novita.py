"""Novita AI (seed 000: /work/shared/seeds/000_4c9e5c7ab169b0c1.txt): plain
OpenAI wire format; sends its own ``content_filter_results`` per choice, which
the gateway merges with its own.

The page lists its parameters (max_tokens, temperature, top_p, min_p, top_k,
the three penalties, response_format) but no ranges, so none is declared: the
gateway's own validation is all there is (the temperature [0, 2], top_p
[0, 1] and min_p [0, 1] once declared here were equal to or wider than it,
and could never act).
"""

from providers.base import Provider

PROVIDER = Provider(name="novita")
