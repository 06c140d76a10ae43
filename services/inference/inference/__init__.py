"""nanochat inference: an OpenAI-compatible server over the continuous-batching scheduler (`python -m inference`)."""
