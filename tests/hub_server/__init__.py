"""A local, stdlib-only server speaking the subset of the Hugging Face Hub HTTP API used by huggingface_hub 2.4.

See `docs/hub.md` ("Testing against a local Hub") for what it covers and what it does not.
"""

from .app import OTHER_TOKEN, READ_TOKEN, UPLOAD_MODES, WRITE_TOKEN, LocalHub
from .client import configure_hub_client, set_offline


__all__ = [
    "OTHER_TOKEN", "READ_TOKEN", "UPLOAD_MODES", "WRITE_TOKEN", "LocalHub", "configure_hub_client", "set_offline",
]
