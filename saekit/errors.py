"""The base of every error a user can fix; stages print these as one clear message, no traceback."""


class PipelineError(Exception):
    """A mistake in settings, inputs or artifacts, with a message that says what to do."""
