"""Errors raised by pydagnn's file readers and writers."""


class MatFileError(ValueError):
    """A ``.mat`` file (or one of its fields) is missing, truncated or malformed.

    ``MatFileError(path, field, message)`` reads ``"<path>: field 'images.labels': <message>"``
    (``field`` may be ``None`` when the whole file is at fault). The parts are kept as
    ``.path``, ``.field`` and ``.reason``. Instances pickle (worker processes may raise them).
    """

    def __init__(self, path, field=None, message=''):
        self.path = None if path is None else str(path)
        self.field = field
        self.reason = message
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if field:
            parts.append(f'field {field!r}')
        parts.append(message or 'malformed file')
        super().__init__(': '.join(parts))

    def __reduce__(self):
        return (type(self), (self.path, self.field, self.reason))
