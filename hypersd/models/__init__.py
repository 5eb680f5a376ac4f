"""Model construction: the bundled mini model's architecture and text encoder."""
