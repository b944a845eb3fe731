"""Context management: keep what goes upstream within the model's token budget.

``manager.ContextManager`` is what the pipeline calls; the other modules each hold one piece
(settings, budget, units, importance, summarizer, summaries, retrieval, assemble). This file
imports nothing; the ``context`` options are validated by ``proxy.config.context``.
"""
