"""Everything TRL, transformers, diffusers and accelerate import from `peft` exists under the alias.

Reads the installed libraries' sources (every ``from peft... import name``, at any depth) and resolves
each name through `peft_fast.install_as_peft()`. Each must be peft_fast's own object, except the
placeholders listed here: PEFT methods peft_fast does not implement, which the libraries only import
for ``isinstance`` checks or for those methods' own code paths (using one raises NotImplementedError).
"""
import ast
import importlib
import os
import warnings

import pytest

import peft_fast

LIBRARIES = ("transformers", "trl", "diffusers", "accelerate")
PLACEHOLDERS = {
    ("peft", "LoKrConfig"),  # diffusers: loading LoKr checkpoints
    ("peft", "PeftMixedModel"),  # transformers: isinstance check next to PeftModel
    ("peft", "PrefixTuningConfig"),  # trl: isinstance checks (prefix tuning: issue #15)
    ("peft", "PromptLearningConfig"),  # trl: isinstance checks
    ("peft.tuners.loha.layer", "LoHaLayer"),  # diffusers: layer names for layerwise casting
    ("peft.tuners.lokr.layer", "LoKrLayer"),
    ("peft.tuners.lokr.layer", "factorization"),  # diffusers: LoKr checkpoints
}


def _peft_imports():
    found = {}
    for lib in LIBRARIES:
        root = os.path.dirname(importlib.util.find_spec(lib).origin)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    src = fh.read()
                if "peft" not in src:
                    continue
                for node in ast.walk(ast.parse(src)):
                    if isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                            node.module == "peft" or node.module.startswith("peft.")):
                        for alias in node.names:
                            found.setdefault((node.module, alias.name), os.path.relpath(path, root))
    return found


def test_every_name_the_libraries_import_from_peft_resolves_under_the_alias():
    imports = _peft_imports()
    assert len(imports) >= 25  # the scan found the libraries' imports
    problems, placeholders = [], set()
    with warnings.catch_warnings(), peft_fast.as_peft():
        warnings.simplefilter("ignore")
        for (module, name), where in sorted(imports.items()):
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                problems.append(f"{module}.{name} (imported in {where}): {type(e).__name__}: {e}")
                continue
            if hasattr(obj, "_peft_fast_missing"):
                placeholders.add((module, name))
            elif not (getattr(obj, "__module__", "") or "").startswith("peft_fast") and not isinstance(obj, type(os)):
                problems.append(f"{module}.{name}: {obj!r} is not peft_fast's")
    assert not problems, "\n".join(problems)
    assert placeholders == PLACEHOLDERS & set(imports), sorted(placeholders ^ (PLACEHOLDERS & set(imports)))


@pytest.mark.parametrize("module,name", sorted(PLACEHOLDERS))
def test_the_placeholders_name_what_is_missing(module, name):
    with peft_fast.as_peft():
        obj = getattr(importlib.import_module(module), name)
        with pytest.raises(NotImplementedError, match=f"`{module}.{name}`"):
            obj()
