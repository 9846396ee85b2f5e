"""Domain errors shared by every role.

Domain code raises these; ``lepton.rpc`` maps each class to one gRPC status code in a single table,
and clients map status codes back. Expected outcomes ("no shard yet", "gradient stale") are never
errors: they are fields of a response.
"""


class LeptonError(Exception):
    """Base of every error Lepton reports to a caller."""


class InvalidArgument(LeptonError):
    """The request is malformed or out of range; nothing was changed."""


class NotFound(LeptonError):
    """A named member, shard, tensor or epoch does not exist."""


class FailedPrecondition(LeptonError):
    """The request does not fit the current state (fenced member, lease not held, ...)."""


class Fenced(FailedPrecondition):
    """The member's incarnation was declared dead; it must re-register."""


class OptimizerFailed(FailedPrecondition):
    """A parameter server's optimizer step raised: it refuses every later update, and the job
    fails with this reason (the server reports it to the coordinator)."""


class DuplicateCompletion(FailedPrecondition):
    """The shard was already completed in this epoch."""


class ResourceExhausted(LeptonError):
    """A size or concurrency limit was hit."""


class Refused(ResourceExhausted):
    """A server's call limits (``lepton.limits``) refused the call before it ran: nothing changed,
    so the same request may be retried after ``retry_after_s`` seconds (with jitter). Sent as
    RESOURCE_EXHAUSTED with the delay in the trailing metadata key ``lepton-retry-after-ms``."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(LeptonError):
    """Credentials are missing or wrong."""


class PermissionDenied(LeptonError):
    """Valid credentials without the role the call needs."""


class Unavailable(LeptonError):
    """The peer cannot be reached right now; retrying may help."""


class NotReady(Unavailable):
    """The server cannot answer yet (a parameter server that has not loaded its assignment, a
    coordinator that has not decided the layout): nothing changed; retry after ``retry_after_s``
    seconds (None: unknown, back off). Sent as UNAVAILABLE with the delay in the trailing
    metadata key ``lepton-retry-after-ms`` (protos/lepton/v1/options.proto)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StateNotSaved(Unavailable):
    """The coordinator could not commit a change to its state directory (disk full, I/O error):
    the change was rolled back, so retrying may succeed once the disk has room again."""


class Cancelled(LeptonError):
    """The client left (cancelled, or its deadline passed) before its request was whole."""


class DeadlineExceeded(LeptonError):
    """The call did not finish before its deadline."""


class ConfigError(LeptonError):
    """A configuration value is invalid (raised at start-up, never over the wire)."""
