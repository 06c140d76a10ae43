"""What the services and the ML library agree on, written once: one flat module per contract.

- `stages`: the registry stages a model version can have.
- `names`: the model-name and alias patterns.
- `serving`: which version the inference server serves.
- `events`: the JSON lines a stage writes on stdout and the trainer reads.
- `manifest`: the `manifest.json` of an artifact folder: writing, checking, reading it.
"""
