"""RAG architectures, one module each, registered by name in `registry`."""
