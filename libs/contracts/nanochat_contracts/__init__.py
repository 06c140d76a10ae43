"""What the services and the ML library agree on, written once: one flat module per contract.

- `stages`: the registry stages a model version can have.
- `names`: the model-name and alias patterns.
- `serving`: which version the inference server serves.
- `events`: the JSON lines a stage writes on stdout and the trainer reads.
- `registry_events`: what the registry publishes on Redis when its versions change.
- `manifest`: the `manifest.json` of an artifact folder: writing, checking, reading it.
"""
