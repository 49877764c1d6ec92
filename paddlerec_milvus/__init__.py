"""paddlerec-milvus: MIND multi-interest candidate generation with Milvus."""

__version__ = "0.1.0"
