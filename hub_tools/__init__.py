"""hub_tools: push and pull JD-LoRA collections on the Hugging Face Hub.

* `push_collection(collection_dir, repo=...)` or `push_collection(collection_dir, bases_repo=..., adapter_repo=...)`
* `pull_adapter(repo_id, subfolder=..., revision=...)`, `pull_collection(repo_id, names=...)`
* `list_collection(repo_id)`

See `docs/hub.md`.
"""

from .collection import CollectionListing, ListedAdapter, list_collection, pull_collection
from .errors import BasesPullError, CollectionError, HubAuthError, HubToolsError, HubUsageError, PullError, PushError
from .pull import PulledAdapter, pull_adapter
from .push import PushedAdapter, PushResult, push_collection


__all__ = [
    "BasesPullError",
    "CollectionError",
    "CollectionListing",
    "HubAuthError",
    "HubToolsError",
    "HubUsageError",
    "ListedAdapter",
    "PullError",
    "PulledAdapter",
    "PushError",
    "PushResult",
    "PushedAdapter",
    "list_collection",
    "pull_adapter",
    "pull_collection",
    "push_collection",
]
