"""`GET /stages`: the stages and pipelines a job may run, with their option schemas."""

from fastapi import APIRouter
from nanochat.stages.options import PIPELINES, PRESETS

from trainer.schemas import StagesOut, job_option_schemas

router = APIRouter()


@router.get("/stages", response_model=StagesOut)
def list_stages() -> StagesOut:
    """Every stage with its option JSON Schema and the registry stage of the input it expects."""
    return StagesOut(stages=job_option_schemas(), pipelines=PIPELINES, presets=sorted(PRESETS))
