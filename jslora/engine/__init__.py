"""The serving engine: adapter tiers, step metadata, and the loop that runs jitted steps on the pool."""
from jslora.engine.config import EngineConfig
from jslora.engine.engine import Engine
from jslora.request import Request, RequestOutput, RequestUpdate

__all__ = ["Engine", "EngineConfig", "Request", "RequestOutput", "RequestUpdate"]
