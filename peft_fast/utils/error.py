"""PEFT's exception classes (peft.utils.error), so `except NoMatchingPeftModuleError` works the same."""


class PeftError(Exception):
    """Base class of peft_fast's (and PEFT's) own errors."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being injected matched no module of the base model (e.g. `target_modules`
    matched nothing). A `ValueError` subclass, as in PEFT, for code that caught the generic error."""
