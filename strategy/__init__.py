"""The business problem as math: objectives YAML -> validated Strategy -> ranked slates.

Pure Python + numpy: importing ``strategy`` never imports torch.
"""
from .blend import blend
from .config import Strategy, load_strategy, parse_override, strategy_from_dict
from .errors import FieldError, ValidationError
from .rerank import RankResult, rank
from .schema import Candidate, FeedbackEvent, Impression, Request, parse_event, parse_events, parse_request

__all__ = [
    "Candidate", "FeedbackEvent", "FieldError", "Impression", "RankResult", "Request", "Strategy",
    "ValidationError", "blend", "load_strategy", "parse_event", "parse_events", "parse_override",
    "parse_request", "rank", "strategy_from_dict",
]
