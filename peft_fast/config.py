"""`PeftConfig`: the base of every adapter config, with PEFT's fields and JSON format (L4)."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from .utils.constants import CONFIG_NAME
from .utils.io import atomic_write_text
from .utils.peft_types import PeftType, TaskType

# The PEFT release whose adapter format we read and write; recorded in adapter_config.json.
PEFT_FORMAT_VERSION = "0.21.2"
# PEFT's name for it in this module (``peft.config.__version__``): the `peft_version` of new configs.
__version__ = PEFT_FORMAT_VERSION

# we expect at least these keys to be present in a PEFT adapter_config.json
MIN_EXPECTED_CONFIG_KEYS = {"peft_type"}


def _is_dev_version(version: str) -> bool:
    import packaging.version

    return packaging.version.Version(version).dev is not None


def _get_commit_hash(pkg_name: str) -> Optional[str]:
    """The VCS commit an installed package was built from (pip install git+...@HASH), or None."""
    try:
        dist = importlib.metadata.distribution(pkg_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for path in dist.files or []:
        if path.name == "direct_url.json":
            vcs_info = json.loads(dist.locate_file(path).read_text()).get("vcs_info")
            if vcs_info and "commit_id" in vcs_info:
                return vcs_info["commit_id"]
    return None


@dataclass
class PeftConfig:
    """Fields shared by all methods (same names and defaults as ``peft.PeftConfig``)."""

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The type of task."})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The type of PEFT model."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Custom model class mapping."})
    peft_version: Optional[str] = field(default=None, metadata={"help": "PEFT format version."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The base model."})
    revision: Optional[str] = field(default=None, metadata={"help": "The base model revision."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode."})

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: {', '.join(TaskType)}."
            )
        if self.peft_version is None:
            self.peft_version = self._get_peft_version()

    @staticmethod
    def _get_peft_version() -> str:
        """PEFT's rule: the version, with ``@<commit>`` (or ``@UNKNOWN``) for a dev version."""
        version = __version__
        if not _is_dev_version(version):
            return version
        try:
            git_hash = _get_commit_hash("peft") or "UNKNOWN"
        except Exception:  # noqa: BLE001 - never break user code over the commit hash (PEFT)
            warnings.warn("A dev version of PEFT is used but there was an error while trying to determine the commit "
                          "hash. Please open an issue: https://github.com/huggingface/peft/issues")
            git_hash = "UNKNOWN"
        return f"{version}@{git_hash}"

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def _json_dict(self) -> dict:
        out = self.to_dict()
        for k, v in out.items():
            if isinstance(v, set):
                out[k] = sorted(v)
            elif isinstance(v, (PeftType, TaskType)):
                out[k] = v.value
        return out

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` atomically (temp file + rename)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        out = self._json_dict()
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping_dict is not None:
            out["auto_mapping"] = auto_mapping_dict
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(out, indent=2, sort_keys=True))

    @classmethod
    def from_peft_type(cls, **kwargs) -> "PeftConfig":
        """Build the config class named by ``peft_type``; unknown fields (written by a newer
        PEFT) are dropped with a warning."""
        from .mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        config_cls = cls
        if "peft_type" in kwargs:
            peft_type = kwargs["peft_type"]
            key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)
            if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise ValueError(
                    f"peft_type {key!r} is not supported by peft_fast (supported: {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)})"
                )
            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[key]
        known = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            if not MIN_EXPECTED_CONFIG_KEYS.issubset(set(kwargs) - set(unknown)):  # not a PEFT config at all
                raise TypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                                f"{MIN_EXPECTED_CONFIG_KEYS}.")
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {config_cls.__name__}, these are "
                "ignored. This probably means that you're loading a configuration file that was saved using a "
                "higher version of the library and additional parameters have been introduced since. It is "
                "highly recommended to upgrade the PEFT version before continuing (e.g. by running `pip install "
                "-U peft`)."
            )
        return config_cls(**{k: v for k, v in kwargs.items() if k in known})

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        with open(path_json_file) as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:  # same type, with the file named
            raise json.JSONDecodeError(f"Invalid JSON in {path_json_file!r} (truncated or corrupt?): {exc.msg}",
                                       exc.doc, exc.pos) from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path_json_file} does not hold a JSON object")
        obj.pop("runtime_config", None)
        return obj

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> "PeftConfig":
        """Load ``adapter_config.json`` from a local directory or, when there is none, from the Hugging
        Face Hub repo of that name (``hf_hub_download`` options such as ``revision``, ``cache_dir``,
        ``token``, ``local_files_only`` in `kwargs`, as in PEFT; ``HF_HUB_OFFLINE=1`` reads the cache)."""
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            from .utils.hub import download_adapter_file, hub_error_detail

            try:
                config_file = download_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, **kwargs)
            except Exception as exc:  # noqa: BLE001 - PEFT's text and type, what is missing named, Hub error chained
                detail = hub_error_detail(str(pretrained_model_name_or_path), [CONFIG_NAME], subfolder, exc, kwargs)
                raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}': {detail}") from exc
        loaded = cls.from_json_file(config_file)
        # as in PEFT, `revision` is a download option (the adapter's), not the config's base-model revision
        fields = {f.name for f in dataclasses.fields(cls)} - {"revision"}
        class_kwargs = {k: v for k, v in kwargs.items() if k in fields}
        return cls.from_peft_type(**{**class_kwargs, **loaded})

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False
