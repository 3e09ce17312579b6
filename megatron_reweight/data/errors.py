"""The one exception the data tools raise for bad input or settings."""


class DataPrepError(ValueError):
    """Bad input, tokenizer or output settings; the message names the problem and the fix."""
