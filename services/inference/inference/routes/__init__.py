"""The OpenAI-compatible routes, one module per endpoint; `inference.api` mounts them."""
