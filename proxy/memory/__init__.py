"""Long-term memory: embeddings, vector index, retrieval."""
