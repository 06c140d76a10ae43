"""Alembic environment of the trainer's job records; run through `trainer.db.migrate`."""

from alembic import context
from trainer.db import Base, make_engine

config = context.config


def run() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
