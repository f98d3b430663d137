"""Choosing where a request goes: the catalog, endpoint health, prompt token counts and the router."""
