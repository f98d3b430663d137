"""An OpenAI-compatible LLM routing gateway."""
