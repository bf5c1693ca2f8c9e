"""The error of a bad command line, run file or DeepSpeed config."""


class ConfigError(Exception):
    """A bad command line, run file or DeepSpeed config; the trainer prints `ochat.training.train: error: ...` from
    one rank and exits 2."""

    status = 2
