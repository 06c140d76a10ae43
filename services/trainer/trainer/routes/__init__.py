"""The jobs API's routes, one module per resource; `trainer.api` mounts them."""
