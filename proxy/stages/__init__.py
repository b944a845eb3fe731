"""The stages of a chat turn, one module each, in the order ``proxy/pipeline.py`` awaits them.

identify (``identify``) → load the session (``load``) → answer a retried request from its record
(``replay``) → reconcile the history (``reconcile``) → recall memories (``recall``) and shape the
context (``proxy/context/manager.py``) → call the upstream (``upstream``) → record (``record``).
A stage reads the turn and returns what it decided; only the pipeline writes into the turn.
"""
