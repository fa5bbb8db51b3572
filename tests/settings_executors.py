"""An executor with settings, for tests/test_executor_settings.py: run as
``wayang-mq worker tests.settings_executors:Configured --config FILE``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from wayang_mq import Executor, Task
from wayang_mq.core.model import JsonLike
from wayang_mq.runtime.settings import SecretRef


class ConfiguredSettings(BaseModel):
    """``[demo.echo]``: a greeting, and a token that may be a secret reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    greeting: str
    token: str | SecretRef
    retries: int = 3


class Configured(Executor):
    """``demo.echo``: answers with its settings (the token's length only, never its value)."""

    serves = ("demo.echo",)
    settings_model = ConfiguredSettings

    def __init__(self, settings: ConfiguredSettings) -> None:
        self.settings = settings
        self.token = ""

    async def setup(self) -> None:
        self.token = await self.reveal(self.settings.token)

    async def execute(self, task: Task) -> JsonLike:
        return {
            "greeting": self.settings.greeting,
            "retries": self.settings.retries,
            "token_length": len(self.token),
            "token_is_secret": isinstance(self.settings.token, SecretRef),
        }
