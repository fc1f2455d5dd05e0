"""PEFT's `peft.tuners.delora` import path. peft_fast does not implement DeLoRA (DeloraConfig is
refused); this package only holds the method's default-target table (`model.py`), which PEFT's
tests patch when they check LoRA's default targets."""
