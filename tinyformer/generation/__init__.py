from .api import Completion, check_token_ids, generate
from .beam import Beam, beam_search, beam_search_batch
from .cache import KVCache, kv_cache_bytes
from .decode import Step, TokenStream
from .processors import GenerationError, build_processors
from .text import TextTracker
from .trace import TraceStep, format_trace

__all__ = ["generate", "Completion", "check_token_ids", "beam_search", "beam_search_batch", "Beam", "KVCache", "kv_cache_bytes",
           "TokenStream", "Step", "GenerationError", "build_processors", "TextTracker", "TraceStep", "format_trace"]
