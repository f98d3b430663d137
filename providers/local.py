"""The bundled local backend (``local_backend/``), or any OpenAI-compatible
engine put in its slot (vLLM, ...). Plain OpenAI over HTTP and nothing private."""

from providers.base import Provider

PROVIDER = Provider(name="local", bearer_auth=False)
