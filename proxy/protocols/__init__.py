"""Client protocols at the edge: each module parses one wire format into the canonical turn and renders it back."""
