"""Errors raised by pydagnn's file readers and writers."""


class MatFileError(ValueError):
    """A ``.mat`` file (or one of its fields) is missing, truncated or malformed.

    Forms accepted::

        MatFileError(path, field, message)      # "<path>: field 'images.labels': <message>"
        MatFileError(message, path=..., field=...)
        MatFileError(message)

    ``field`` may be ``None`` when the whole file is at fault. The parts are kept as
    ``.path``, ``.field`` and ``.reason``. Instances pickle (worker processes raise them).
    """

    def __init__(self, *args, path=None, field=None, message=None):
        if len(args) == 3:
            path, field, message = args
        elif len(args) == 2:
            path, message = args
        elif len(args) == 1:
            message = args[0]
        elif args:
            raise TypeError('use MatFileError(path, field, message) '
                            'or MatFileError(message, path=, field=)')
        self.path = None if path is None else str(path)
        self.field = field
        self.reason = '' if message is None else str(message)
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if field:
            parts.append(f'field {field!r}')
        parts.append(self.reason or 'malformed file')
        super().__init__(': '.join(parts))

    def __reduce__(self):
        return (_rebuild, (type(self), self.path, self.field, self.reason))


def _rebuild(cls, path, field, reason):
    return cls(path, field, reason)
