"""The core of peft-jd: what every engine shares, importing neither peft nor transformers.

It holds the collection layout (`layout`), the on-disk format (`format`), the parsed sigma adapter config
(`spec.AdapterSpec`) and its one validation against the bases (`validation`), the process-wide store of shared
bases with the one Hub download helper (`bases_store`, `hub`), atomic writes (`io`) and the errors. The batched
kernels live beside it in `peft_jd.kernels` (also free of peft/transformers). The PEFT tuner, the compression engine
and the Hub tools build on this; the serving engines (`tgi_patch`, `vllm_jd`) import only this and the kernels.
"""

from .bases_store import BasesKey, SharedBases, load_shared_bases, resolve_bases_key
from .errors import (
    AdapterFormatError,
    AdapterNameError,
    BaseModelMismatchError,
    BasesMismatchError,
    BasesNotFoundError,
    JDLoraError,
    ShapeMismatchError,
    SigmaTypeMismatchError,
    UnknownAdapterError,
    warn_once,
)
from .format import (
    FORMAT_VERSION,
    BasesConfig,
    ModuleBasesSpec,
    adapter_config_dict,
    check_finite,
    file_sha256,
    looks_like_local_path,
    module_key_from_sigma_key,
    write_adapter_config,
    write_bases,
    write_sigma_adapter,
)
from .hub import hub_download
from .io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object
from .layout import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ADAPTERS_DIR,
    BASES_CONFIG_NAME,
    BASES_DIR,
    BASES_WEIGHTS_NAME,
    CARD_NAME,
    INDEX_NAME,
    PEFT_KEY_PREFIX,
    PEFT_TYPE,
    REPORT_NAME,
    SIGMA_KEY_SUFFIX,
    adapter_dir,
    adapter_subfolder,
    adapters_dir,
    bases_dir,
    check_path_component,
    confined_path,
    is_collection_root,
    report_path,
    sigma_state_dict_key,
)
from .spec import AdapterSpec, cluster_for, is_jd_adapter_dir, is_relative_reference, resolve_relative_bases
from .validation import read_adapter_tensors, read_sigma_shapes, split_adapter_keys, validate_against_bases


__all__ = [name for name in dir() if not name.startswith("_")]
