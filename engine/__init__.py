"""AMUSD engine: supervisor, draft/verify workers, decoding and the async protocol (no HTTP)."""
