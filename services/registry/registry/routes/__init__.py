"""The registry's routes, one module per resource; `registry.api` mounts them under /v1."""
