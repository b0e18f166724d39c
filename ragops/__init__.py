"""ragops: build, train, evaluate and compare RAG architectures, and what each one costs."""

__version__ = "0.1.0"
