"""The error every ingest module raises when a source cannot be read at all."""


class IngestError(ValueError):
    """The source cannot be read at all (missing root, malformed index file); names the file."""
