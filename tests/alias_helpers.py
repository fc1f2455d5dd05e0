"""Shared by the tests of libraries running on peft_fast through the peft alias."""
import contextlib

import peft_fast


@contextlib.contextmanager
def alias(on: bool):
    """`import peft` gives peft_fast inside the block when `on`, real peft otherwise; uninstalled after."""
    assert not peft_fast.is_installed_as_peft()
    if on:
        peft_fast.install_as_peft()
    try:
        import peft

        assert (peft.LoraConfig is peft_fast.LoraConfig) == on
        yield peft
    finally:
        peft_fast.uninstall_as_peft()
    import peft

    assert peft.LoraConfig is not peft_fast.LoraConfig
