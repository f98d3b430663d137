"""The bundled local backend (``local_backend/``), or any OpenAI-compatible
engine put in its slot (vLLM, ...). Plain OpenAI over HTTP and nothing private.

The bundled backend takes n = 1 only and at most 4 stop strings
(``local_backend/server.py``, ``local_backend/sampling.py``); both are strict
parameters, so a request asking for more never goes there. The gateway never
sends it a key, even where ``[providers.local] api_key_env`` names one."""

from providers.base import Provider, Range

PROVIDER = Provider(name="local", bearer_auth=False, ranges={"n": Range(1, 1), "stop": Range(max=4)})
