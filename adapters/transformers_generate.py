"""Running an exported decoder in ONNX Runtime: consistent sample inputs, greedy generation, perplexity.

Kept for the adapter's users: the one definition of each lives in :mod:`modelpress.evaluation.text`
(reached through :mod:`modelpress.plugin_api`), where ``modelpress compress`` judges decoders with them.
"""

from __future__ import annotations

from modelpress.plugin_api import decoder_sample, greedy_generate, perplexity

__all__ = ["decoder_sample", "greedy_generate", "perplexity"]
