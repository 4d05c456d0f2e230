"""OpenAI-compatible HTTP frontend (FastAPI); imports no torch."""
