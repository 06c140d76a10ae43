"""The nanochat trainer service: `POST /v1/jobs` queues a stage (or a pipeline of stages) on Redis
through RQ; workers run each stage under torchrun in its own session, read its JSON-line events,
keep its log and push its output checkpoint to the registry with lineage.

    python -m trainer api       # the FastAPI jobs API (settings: TRAINER_* environment variables)
    python -m trainer worker    # one worker: takes jobs off the queue, reaps dead workers' jobs
"""

__version__ = "0.1.0"
