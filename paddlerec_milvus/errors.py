"""One family of errors, so CLIs and services can tell a user's mistake from a bug.

Milvus trouble is typed once, by the index (``milvus_index``), so each front end maps it to
its own answer (HTTP status, pipeline err_no) without reading messages."""


class PaddleRecMilvusError(Exception):
    """Base class: the message names the problem and is safe to show a user."""


class ConfigError(PaddleRecMilvusError):
    """A config file, key, override or value is wrong."""


class DataError(PaddleRecMilvusError):
    """Input data is malformed (the message names file and line, field or value)."""


class MilvusIndexError(PaddleRecMilvusError):
    """The vector index (Milvus) refused or could not be reached."""


class MilvusUnavailable(MilvusIndexError):
    """Milvus cannot be reached in time (down, restarting, network, deadline passed)."""


class CollectionUnavailable(MilvusIndexError):
    """Milvus answers, but the collection to search is missing or empty (dropped, not exported)."""


class MilvusRequestRejected(MilvusIndexError):
    """Milvus refused what it was asked (bad expression, wrong parameters): the caller's mistake."""


class AliasInUse(MilvusIndexError):
    """A collection cannot be dropped because an alias points at it (drop the rows instead)."""


class RequestError(PaddleRecMilvusError):
    """A recall request is invalid (bad ids, empty history, top_k out of range...)."""


class Overloaded(PaddleRecMilvusError):
    """The service is at capacity or the request's deadline passed: retry later."""


class DeadlineExceeded(Overloaded):
    """The request's deadline passed before it could run (it waited in a queue): not run."""
