"""Conversations for tests: the bundled ShareGPT sample, normalised as the data CLI does."""
from ochat.assets import SHAREGPT_SAMPLE
from ochat.data import formats
from ochat.data.sources import open_source


def sample_records() -> list:
    """The bundled sample's raw records (ShareGPT dicts)."""
    return [rec for _, rec in open_source(SHAREGPT_SAMPLE)]


def sample_conversations(model_type, n: int | None = None) -> list:
    """The bundled sample's conversations (formats.Conversation), skipped records left out; the first n."""
    convs = [formats.normalize(rec, model_type, model_type.condition_weights, model_type.default_condition)
             for rec in sample_records()]
    return [c for c in convs if not isinstance(c, str)][:n]
