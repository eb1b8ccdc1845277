"""Error codes shared by every transport (sent as ``ERROR [code, text]``) and the
exceptions that carry them through the core."""

from __future__ import annotations

BAD_FRAME = "BAD_FRAME"  # not JSON, not UTF-8, not {"CmdName": str, "Args": [str]}
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"  # length prefix above max_frame; connection closed
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
BAD_ARGS = "BAD_ARGS"  # wrong number or shape of arguments
NOT_LOGGED_IN = "NOT_LOGGED_IN"  # a command other than SEND_CLIENT_ID before login
ALREADY_LOGGED_IN = "ALREADY_LOGGED_IN"
AUTH_FAILED = "AUTH_FAILED"  # unknown device or wrong token; connection closed
REVOKED = "REVOKED"  # the device is revoked; connection closed
V1_NOT_ALLOWED = "V1_NOT_ALLOWED"  # token-less login for a device without --v1
UNKNOWN_DEVICE = "UNKNOWN_DEVICE"  # recipient is not registered
UNKNOWN_TOPIC = "UNKNOWN_TOPIC"
TOPIC_EXISTS = "TOPIC_EXISTS"
NOT_A_MEMBER = "NOT_A_MEMBER"  # send to / leave a topic the device is not in
FORBIDDEN = "FORBIDDEN"  # e.g. joining a closed topic
DUPLICATE_ID = "DUPLICATE_ID"  # another sender's message with this id is pending
QUEUE_FULL = "QUEUE_FULL"  # recipient's offline queue is at its bound; not accepted
UNAVAILABLE = "UNAVAILABLE"  # store busy or down; not accepted, retry later
SESSION_REPLACED = "SESSION_REPLACED"  # sent to the old connection on a second login
KEEPALIVE_TIMEOUT = "KEEPALIVE_TIMEOUT"
RATE_LIMITED = "RATE_LIMITED"  # over limits.msg_rate / byte_rate; not accepted, retry later
THROTTLED = "THROTTLED"  # too many failed logins from this address or as this id; closed
E2E_UNSUPPORTED = "E2E_UNSUPPORTED"  # sealed message to a recipient on a v1 session
CREDENTIALS_CHANGED = "CREDENTIALS_CHANGED"  # ``device rotate`` while connected; closed
BAD_SEAL = "BAD_SEAL"  # a PSK-sealed body that does not open at the gateway; not accepted


class FishChatError(Exception):
    """An error a device or an operator is told about, with a code from this module."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def reason(exc: BaseException | None) -> str:
    """Why a connection or an I/O call failed, in a few lower-case words for a one-line
    log or error ("timed out", "connection refused", the OS's text); None: "closed"."""
    if exc is None:
        return "closed"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
