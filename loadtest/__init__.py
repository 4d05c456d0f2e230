"""Load generator for a running server: python -m loadtest --help."""
