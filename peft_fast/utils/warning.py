"""PEFT's warning category (``peft.utils.warning.PeftWarning``), for ``warnings.filterwarnings``."""


class PeftWarning(UserWarning):
    """Base class of the warnings PEFT (and peft_fast) emit about adapters."""
