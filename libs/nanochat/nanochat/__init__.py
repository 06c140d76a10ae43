"""nanochat: the ML core of the platform (tokenizer, model, optimizers, engine, stages)."""

__version__ = "0.1.0"
