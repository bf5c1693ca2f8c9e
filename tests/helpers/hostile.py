"""Hostile inputs for the tests that must stay harmless."""


class CodeRunningPickle:
    """An object whose unpickling runs code (it creates the file `marker`): what a planted payload does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
