"""Build hook for the optional C++ extension `peft_fast._C` (csrc/).

The extension arrives with the mixed-batch issue; until then this builds nothing and the
package installs as pure Python. `PEFT_FAST_SKIP_CPP=1` will skip the build then too.
"""
from setuptools import setup

setup()
