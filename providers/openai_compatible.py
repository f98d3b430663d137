"""Any OpenAI-compatible endpoint: the shared base with no quirks. Providers
named in a config but not known here get this one."""

from providers.base import Provider

PROVIDER = Provider(name="openai")
