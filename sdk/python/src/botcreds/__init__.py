"""botcreds: a client for the botcreds broker — short-lived GitHub tokens and LiteLLM keys for bots.

    from botcreds import BrokerClient
    client = BrokerClient(broker_url="https://creds.internal", bot_id="machina-bot",
                          api_key=os.environ["BROKER_API_KEY"])
    creds = client.get_credentials(repo="myorg/target-repo", permissions=["contents:write"],
                                   reason="Fixing bug #123", wait_for_approval=True, ttl="1h")

See docs/sdk-python.md.
"""

from typing import TYPE_CHECKING, Any

from ._core import VERSION as __version__
from ._creds import Attribution, CredentialRequest, Credentials, LitellmKey, PendingApproval
from ._errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalTimeout,
    BotcredsError,
    BrokerError,
    BrokerUnavailable,
    PolicyDenied,
    SessionClosed,
)
from ._sync import BrokerClient, Session

if TYPE_CHECKING:
    from ._async import AsyncBrokerClient, AsyncSession


def __getattr__(name: str) -> Any:
    # The async client is imported on first use: asyncio alone costs tens of milliseconds at
    # import, which a synchronous bot would pay for nothing.
    if name in ("AsyncBrokerClient", "AsyncSession"):
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module 'botcreds' has no attribute {name!r}")


__all__ = [
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalTimeout",
    "AsyncBrokerClient",
    "AsyncSession",
    "Attribution",
    "BotcredsError",
    "BrokerClient",
    "BrokerError",
    "BrokerUnavailable",
    "CredentialRequest",
    "Credentials",
    "LitellmKey",
    "PendingApproval",
    "PolicyDenied",
    "Session",
    "SessionClosed",
    "__version__",
]
