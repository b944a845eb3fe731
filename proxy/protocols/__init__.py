"""Client protocols at the edge: each parses its wire format into the canonical chat body and renders results back."""
