"""`peft_fast.install_as_peft()`: ``import peft`` gives peft_fast, undoably, with and without real peft."""
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import peft_fast
from peft_fast import _peft_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *, hide_peft: bool, env=None) -> dict:
    """Run `code` in a fresh interpreter (real peft hidden if asked); it prints one JSON line last."""
    prelude = "import tests.no_peft as _n; _n.hide_real_peft()\n" if hide_peft else ""
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PEFT_FAST_TRAINER_INTEGRATION": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_peft_gives_peft_fast_and_uninstall_gives_real_peft_back():
    import peft as real

    real_lora = sys.modules.get("peft.tuners.lora")
    with peft_fast.as_peft():
        assert peft_fast.is_installed_as_peft()
        import peft
        from peft import LoraConfig, PeftModel, get_peft_model
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        assert peft is not real and peft.__version__ == _peft_manifest.PEFT_VERSION
        assert LoraConfig is peft_fast.LoraConfig and PeftModel is peft_fast.PeftModel
        assert get_peft_model is peft_fast.get_peft_model
        # the same module objects under both names; peft_fast's modules keep their own spec
        import peft_fast.tuners.lora.layer as own

        assert sys.modules["peft.tuners.lora.layer"] is own and LoraLinear is own.Linear
        assert own.__spec__.name == "peft_fast.tuners.lora.layer" and not hasattr(own, "__path__")
        assert BaseTunerLayer is importlib.import_module("peft_fast.tuners.tuners_utils").BaseTunerLayer
        assert importlib.util.find_spec("peft") is not None
    assert not peft_fast.is_installed_as_peft()
    import peft

    assert peft is real and sys.modules.get("peft.tuners.lora") is real_lora
    assert not any(type(m).__module__.startswith("peft_fast") for n, m in sys.modules.items()
                   if n == "peft" or n.startswith("peft."))
    # the alias left no module __getattr__ behind on peft_fast's modules
    assert "__getattr__" not in vars(importlib.import_module("peft_fast.tuners.lora.layer"))


def test_install_is_idempotent_and_as_peft_keeps_an_outer_install(peft_alias):
    import peft

    peft_fast.install_as_peft()
    with peft_fast.as_peft():
        pass
    assert peft_fast.is_installed_as_peft()
    import peft as again

    assert again is peft


def test_a_model_built_through_the_alias_has_peft_fast_layers_and_peft_numbers(peft_alias):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft as alias_peft
    from peft_fast.tuners.lora.layer import LoraLayer

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    cfg_kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    ours = alias_peft.get_peft_model(base, alias_peft.LoraConfig(**cfg_kwargs))
    assert sum(isinstance(m, LoraLayer) for m in ours.modules()) == 6
    peft_fast.uninstall_as_peft()
    import peft as real

    assert real.__file__ != peft_fast.__file__
    ref_base = LlamaForCausalLM(cfg)
    ref_base.load_state_dict(state)
    torch.manual_seed(1)
    ref = real.get_peft_model(ref_base, real.LoraConfig(**cfg_kwargs))
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_what_peft_has_and_peft_fast_lacks_is_a_placeholder_that_names_itself(peft_alias):
    from peft import PrefixTuningConfig, PromptLearningConfig, get_model_status  # noqa: F401
    from peft.tuners.lokr.layer import LoKrLayer, factorization

    assert not isinstance(object(), PrefixTuningConfig) and isinstance(PrefixTuningConfig, type)
    with pytest.raises(NotImplementedError, match=r"peft_fast does not provide `peft\.PrefixTuningConfig`"):
        PrefixTuningConfig(num_virtual_tokens=4)
    with pytest.raises(NotImplementedError, match=r"`peft\.tuners\.lokr\.layer\.factorization`"):
        factorization(16, 4)
    assert not hasattr(LoKrLayer, "update_layer")
    with pytest.raises(AttributeError, match=r"peft\.tuners\.lokr\.layer\.LoKrLayer"):
        LoKrLayer.update_layer
    # static layer metadata is PEFT's (diffusers' layerwise casting reads it off every layer class)
    assert "lokr_w1" in LoKrLayer.adapter_layer_names
    # a name PEFT has in a module peft_fast also has
    from peft.tuners.lora.layer import LoraEmbeddingATPHolder

    with pytest.raises(NotImplementedError, match=r"`peft\.tuners\.lora\.layer\.LoraEmbeddingATPHolder`"):
        LoraEmbeddingATPHolder()
    # the same placeholder each time
    from peft import PrefixTuningConfig as again

    assert again is PrefixTuningConfig


def test_what_neither_has_raises_the_usual_errors(peft_alias):
    import peft

    with pytest.raises(ModuleNotFoundError, match=r"No module named 'peft\.no_such_module'"):
        importlib.import_module("peft.no_such_module")
    assert importlib.util.find_spec("peft.no_such_module") is None
    assert importlib.util.find_spec("peft.tuners.vera") is not None  # PEFT has it: a placeholder module
    with pytest.raises(ImportError, match="no_such_name"):
        exec("from peft import no_such_name", {})
    with pytest.raises(ImportError, match="no_such_name"):
        exec("from peft.tuners.lora.layer import no_such_name", {})
    assert not hasattr(peft, "NoSuchThing")


def test_modules_imported_before_are_rebound_and_put_back():
    import trl.trainer.sft_trainer as sft

    import peft as real

    assert sft.PeftModel is real.PeftModel
    with peft_fast.as_peft():
        assert sft.PeftModel is peft_fast.PeftModel and sft.get_peft_model is peft_fast.get_peft_model
        assert sft.peft.__version__ == _peft_manifest.PEFT_VERSION and sft.peft is not real
        with pytest.raises(NotImplementedError, match="PrefixTuningConfig"):
            sft.PrefixTuningConfig()
    assert sft.PeftModel is real.PeftModel and sft.peft is real


def test_modules_imported_under_the_alias_get_real_peft_back_on_uninstall():
    import types

    from peft_fast import _alias_rebind

    src = "if True:\n    import peft\n    from peft import PeftModel, PrefixTuningConfig as PTC\nLOCAL = 1\n"
    mod = types.ModuleType("trl._peft_fast_test_module")
    mod.__file__ = os.path.join(ROOT, "tests", "_tmp_alias_module.py")
    with open(mod.__file__, "w") as f:
        f.write(src)
    try:
        sys.modules[mod.__name__] = mod
        with peft_fast.as_peft():
            exec(compile(src, mod.__file__, "exec"), mod.__dict__)
            assert mod.PeftModel is peft_fast.PeftModel
        import peft as real

        assert mod.PeftModel is real.PeftModel and mod.PTC is real.PrefixTuningConfig and mod.peft is real
        assert mod.LOCAL == 1
        # a name the module set to its own value is never touched
        mod.PeftModel = "mine"
        undo = _alias_rebind.rebind_imported_modules(stale=_alias_rebind.from_alias)
        undo()
        assert mod.PeftModel == "mine"
    finally:
        sys.modules.pop(mod.__name__, None)
        os.remove(mod.__file__)


def test_transformers_probes_follow_the_alias(peft_alias):
    from transformers.utils import import_utils as tiu

    assert tiu.is_peft_available() and tiu.is_peft_greater_or_equal("0.18.0")


def test_without_real_peft_the_alias_supplies_peft_and_its_metadata():
    out = _run("""
        import importlib.metadata as md, json
        import transformers.utils.import_utils as tiu
        import diffusers.utils.import_utils as diu
        import accelerate.utils as au
        before = [tiu.is_peft_available(), diu.is_peft_available(), bool(au.is_peft_available())]
        try:
            import peft
            before.append(True)
        except ImportError:
            before.append(False)
        import peft_fast
        peft_fast.install_as_peft()
        import peft
        from peft import LoraConfig, PeftModel
        during = [tiu.is_peft_available(), diu.is_peft_available(), bool(au.is_peft_available()), md.version("peft"),
                  peft.__version__, PeftModel is peft_fast.PeftModel, diu.is_peft_version(">=", "0.14.0"),
                  any(d.metadata["Name"] == "peft" for d in md.distributions())]
        peft_fast.uninstall_as_peft()
        after = [tiu.is_peft_available(), diu.is_peft_available(), bool(au.is_peft_available())]
        try:
            md.version("peft"); after.append("dist")
        except md.PackageNotFoundError:
            after.append(None)
        try:
            import peft; after.append("import")
        except ImportError:
            after.append(None)
        print(json.dumps(dict(before=before, during=during, after=after)))
    """, hide_peft=True)
    v = _peft_manifest.PEFT_VERSION
    assert out["before"] == [False, False, False, False]
    assert out["during"] == [True, True, True, v, v, True, True, True]
    assert out["after"] == [False, False, False, None, None]


def test_trl_imported_without_peft_before_the_switch_gets_the_names_it_skipped():
    out = _run("""
        import json
        import trl.trainer.sft_trainer as sft
        had = hasattr(sft, "PeftModel")
        import peft_fast
        peft_fast.install_as_peft()
        print(json.dumps(dict(had=had, now=sft.PeftModel is peft_fast.PeftModel,
                              config=sft.PeftConfig is peft_fast.PeftConfig)))
    """, hide_peft=True)
    assert out == {"had": False, "now": True, "config": True}


def test_environment_variable_installs_the_alias():
    out = _run("""
        import json, peft_fast, peft
        print(json.dumps(dict(on=peft_fast.is_installed_as_peft(), same=peft.LoraConfig is peft_fast.LoraConfig)))
    """, hide_peft=True, env={"PEFT_FAST_AS_PEFT": "1"})
    assert out == {"on": True, "same": True}


def test_peft_warning_is_a_user_warning_category(peft_alias):
    from peft import PeftWarning

    assert PeftWarning is peft_fast.PeftWarning and issubclass(PeftWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=PeftWarning)
        with pytest.raises(PeftWarning):
            warnings.warn("x", PeftWarning)


def regenerate_manifest() -> dict:
    """PEFT's names as the installed peft has them (what peft_fast/_peft_manifest.py must hold)."""
    import pkgutil

    import peft

    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = sorted(m.name for m in pkgutil.walk_packages(peft.__path__, "peft."))
    names, layers = {}, {}
    for m in modules:
        try:
            mod = importlib.import_module(m)
        except Exception:  # noqa: BLE001 - optional dependencies of peft's own modules
            continue
        for k, v in vars(mod).items():
            if isinstance(v, type) and issubclass(v, BaseTunerLayer) and v.__module__ == m:
                layers[f"{m}.{k}"] = (tuple(v.adapter_layer_names), tuple(v.other_param_names))
        pub = set(getattr(mod, "__all__", [])) | {
            k for k, v in vars(mod).items() if not k.startswith("_") and getattr(v, "__module__", None) == m}
        pub = sorted(k for k in pub if not k.isupper() and not k.startswith("_"))
        if pub:
            names[m] = tuple(pub)
    return dict(version=peft.__version__, all=tuple(sorted(peft.__all__)), modules=tuple(modules), names=names,
                layers=layers)


def test_manifest_matches_the_pinned_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = regenerate_manifest()
    assert real["version"] == _peft_manifest.PEFT_VERSION
    assert real["all"] == _peft_manifest.PEFT_ALL
    assert real["modules"] == _peft_manifest.PEFT_MODULES
    assert real["names"] == _peft_manifest.PEFT_MODULE_NAMES
    assert real["layers"] == _peft_manifest.PEFT_LAYER_ATTRIBUTES


def _manifest_source(m: dict) -> str:
    def fmt(xs, ind="    "):
        return textwrap.fill(", ".join(repr(x) for x in xs), 110, initial_indent=ind, subsequent_indent=ind,
                             break_on_hyphens=False)

    body = "\n".join(f"    {k!r}: (\n{fmt(v, '        ')},\n    )," for k, v in m["names"].items())
    layers = "\n".join(f"    {k!r}: (\n        {a!r},\n        {o!r},\n    )," for k, (a, o) in m["layers"].items())
    doc = _peft_manifest.__doc__.replace("PEFT " + _peft_manifest.PEFT_VERSION, "PEFT " + m["version"])
    return (f'"""{doc}"""\nPEFT_VERSION = {m["version"]!r}\n\nPEFT_ALL = (\n{fmt(m["all"])},\n)\n\n'
            f'PEFT_MODULES = (\n{fmt(m["modules"])},\n)\n\nPEFT_MODULE_NAMES = {{\n{body}\n}}\n\n'
            f'# adapter layer classes: (adapter_layer_names, other_param_names), static metadata libraries read\n'
            f'PEFT_LAYER_ATTRIBUTES = {{\n{layers}\n}}\n')


if __name__ == "__main__":  # python tests/test_peft_alias.py > peft_fast/_peft_manifest.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.stdout.write(_manifest_source(regenerate_manifest()))


def test_names_of_modules_with_their_own_getattr_are_answered_too(peft_alias):
    # peft_fast.tuners.lora has a module __getattr__ of its own (lazy bnb layers); PEFT's other names still
    # come as placeholders, and the module's own lazy names still work
    from peft.tuners.lora import LoftQConfig, LoraConfig

    assert LoraConfig is peft_fast.LoraConfig
    with pytest.raises(NotImplementedError, match=r"`peft\.tuners\.lora\.LoftQConfig`"):
        LoftQConfig()
    peft_fast.uninstall_as_peft()
    lora = importlib.import_module("peft_fast.tuners.lora")
    assert not hasattr(lora, "LoftQConfig")
    peft_fast.install_as_peft()


def test_star_import_gives_peft_s_names(peft_alias):
    ns = {}
    exec("from peft import *", ns)
    assert ns["LoraConfig"] is peft_fast.LoraConfig and ns["get_peft_model"] is peft_fast.get_peft_model
    assert hasattr(ns["VeraConfig"], "_peft_fast_missing")


def test_uninstall_leaves_no_placeholder_hanging_on_peft_fast_modules():
    with peft_fast.as_peft():
        importlib.import_module("peft.tuners.loha.layer")
        tuners = importlib.import_module("peft_fast.tuners")
        assert hasattr(tuners, "loha")
    assert not hasattr(importlib.import_module("peft_fast.tuners"), "loha")
    with pytest.raises(ImportError):
        importlib.import_module("peft_fast.tuners.loha")


def test_as_peft_blocks_nest_and_the_last_one_out_uninstalls():
    with peft_fast.as_peft():
        with peft_fast.as_peft():
            pass
        assert peft_fast.is_installed_as_peft()
    assert not peft_fast.is_installed_as_peft()
    peft_fast.install_as_peft()
    try:
        with peft_fast.as_peft():
            pass
        assert peft_fast.is_installed_as_peft()  # installed before the block: stays
    finally:
        peft_fast.uninstall_as_peft()


def test_overlapping_blocks_in_threads_keep_the_alias_until_both_exit():
    import threading

    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        with peft_fast.as_peft():
            inside.set()
            release.wait(30)
            import peft

            seen.append(peft.LoraConfig is peft_fast.LoraConfig)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(30)
    with peft_fast.as_peft():
        pass  # this block exits while the other thread's block is still open
    release.set()
    t.join(60)
    assert seen == [True] and not peft_fast.is_installed_as_peft()


def test_metadata_reports_peft_s_version_even_where_another_peft_is_installed(tmp_path):
    # a fake older peft distribution first on sys.path, as an old pip-installed peft would be
    dist = tmp_path / "peft-0.10.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.10.0\n")
    out = _run(f"""
        import sys, json
        sys.path.insert(0, {str(tmp_path)!r})
        import importlib.metadata as md
        before = md.version("peft")
        import peft_fast
        peft_fast.install_as_peft()
        from transformers.utils.import_utils import is_peft_greater_or_equal
        during = [md.version("peft"), is_peft_greater_or_equal("0.18.0")]
        peft_fast.uninstall_as_peft()
        print(json.dumps(dict(before=before, during=during, after=md.version("peft"))))
    """, hide_peft=False)
    v = _peft_manifest.PEFT_VERSION
    assert out == {"before": "0.10.0", "during": [v, True], "after": "0.10.0"}


def test_diffusers_imported_without_peft_gets_the_peft_backend_from_the_alias():
    out = _run("""
        import json
        from diffusers import UNet2DConditionModel
        import diffusers.loaders.peft as L, diffusers.utils.constants as C
        before = [L.USE_PEFT_BACKEND, C.USE_PEFT_BACKEND]
        import peft_fast
        peft_fast.install_as_peft()
        during = [L.USE_PEFT_BACKEND, C.USE_PEFT_BACKEND]
        peft_fast.uninstall_as_peft()
        after = [L.USE_PEFT_BACKEND, C.USE_PEFT_BACKEND]
        print(json.dumps(dict(before=before, during=during, after=after)))
    """, hide_peft=True)
    assert out == {"before": [False, False], "during": [True, True], "after": [False, False]}


def test_a_script_s_own_peft_imports_are_rebound(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import json, sys\nsys.path.insert(0, %r)\nfrom peft import LoraConfig\nimport peft_fast\n"
                      "peft_fast.install_as_peft()\n"
                      "print(json.dumps(dict(same=LoraConfig is peft_fast.LoraConfig)))\n" % ROOT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"same": True}


def test_peft_s_subpackages_are_attributes_and_star_imports_of_missing_modules_bind_placeholders(peft_alias):
    import peft

    loha = peft.tuners.loha  # as in PEFT, where peft.tuners imports every tuner
    assert loha is sys.modules["peft.tuners.loha"] and hasattr(loha.LoHaConfig, "_peft_fast_missing")
    ns = {}
    exec("from peft.tuners.loha import *", ns)
    assert {"LoHaConfig", "LoHaModel"} <= set(ns) and hasattr(ns["LoHaModel"], "_peft_fast_missing")
    with pytest.raises(AttributeError):
        peft.tuners.no_such_tuner
