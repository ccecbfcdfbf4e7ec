"""The one exception type users catch: every bad file, tensor or parameter raises it with a message naming
the culprit."""


class OrthrusError(ValueError):
    pass
