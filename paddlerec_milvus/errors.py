"""One family of errors, so CLIs and services can tell a user's mistake from a bug."""


class PaddleRecMilvusError(Exception):
    """Base class: the message names the problem and is safe to show a user."""


class ConfigError(PaddleRecMilvusError):
    """A config file, key, override or value is wrong."""


class DataError(PaddleRecMilvusError):
    """Input data is malformed (the message names file and line, field or value)."""


class MilvusIndexError(PaddleRecMilvusError):
    """The vector index (Milvus) refused or could not be reached."""


class RequestError(PaddleRecMilvusError):
    """A recall request is invalid (bad ids, empty history, top_k out of range...)."""
