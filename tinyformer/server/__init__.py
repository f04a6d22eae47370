"""The HTTP server: OpenAI-compatible routes over the continuous-batching engine, and a browser playground."""
from .app import API_KEY_ENV, Limits, create_app

__all__ = ["create_app", "Limits", "API_KEY_ENV"]
