"""Constrained decoding: the logits-processor protocol, response formats and grammar backends.

Import cost is light: the xgrammar and outlines backends load only when a request needs them.
"""

from kvloom.structured.logits_processor import LogitsProcessor, LogitsProcessorFactory
from kvloom.structured.spec import GrammarSpec, ResponseFormat

__all__ = ["GrammarSpec", "LogitsProcessor", "LogitsProcessorFactory", "ResponseFormat"]
