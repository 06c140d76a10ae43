"""What the routes take from the request: the app's runner and model manager."""

from typing import Annotated

from fastapi import Depends, Request

from inference.runs import Runner
from inference.served import ModelManager


def get_runner(request: Request) -> Runner:
    return request.app.state.runner


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


RunnerDep = Annotated[Runner, Depends(get_runner)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
