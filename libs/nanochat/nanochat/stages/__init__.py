"""The pipeline stages, each runnable as `python -m nanochat.stages.<name>` or under torchrun.

`options` holds every stage's pydantic options (no torch needed), `events` the JSON-lines event
schema on stdout, `cli` the argument parsing and run wrapper they share.
"""
