"""The nanochat model registry service (run it with `python -m registry`)."""
