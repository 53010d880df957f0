"""Errors raised by hub_tools. Each names the collection, adapter or repo at fault and says how to fix it."""

from peft_jd.core import BasesNotFoundError, JDLoraError


class HubToolsError(JDLoraError):
    """Base class of hub_tools errors (a `ValueError`, like every peft-jd error)."""


class HubUsageError(HubToolsError):
    """The arguments of a push or pull contradict each other (the CLI exits with status 2)."""


class CollectionError(HubToolsError):
    """The local collection folder is missing files, inconsistent, or not a compressed collection."""


class HubAuthError(HubToolsError):
    """No token, or the Hub rejected it / it lacks write access to the target namespace."""


class PushError(HubToolsError):
    """A push did not complete; what is on the Hub is consistent and re-running the push resumes it."""


class PullError(HubToolsError):
    """An adapter (or its bases) could not be downloaded, or what was downloaded is not a JD-LoRA collection (an
    index or config that is malformed, a name or subfolder that would leave the destination); nothing half-downloaded
    is returned and nothing is written."""


class BasesPullError(PullError, BasesNotFoundError):
    """The bases an adapter pins could not be downloaded (repo, pinned commit or files gone, network, offline)."""
