"""User-facing errors: the CLI prints these as one paragraph, without a traceback."""


class HarnessError(Exception):
    """A problem the user can fix (bad name, bad value, missing file). Message says what and how."""


class UnknownPluginError(HarnessError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ConfigError(HarnessError):
    """An invalid configuration value; raised before any work starts."""


class DataError(HarnessError):
    """A data set is missing, unreadable or has no usable rows."""


class TrainingDivergedError(HarnessError):
    """A loss became NaN or infinite; names the step and the offending terms."""
