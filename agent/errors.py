"""The one exception type front ends turn into a one-line message and an exit code."""


class UserError(Exception):
    """A problem the operator can fix; the message says how. Never a traceback."""

    def __init__(self, message: str, exit_code: int = 1, detail: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        # Extra lines (verifier log...) shown only with --verbose.
        self.detail = detail


# Exit codes, stable so scripts can tell failures apart.
EXIT_USAGE = 2  # bad input: unknown container, bad CIDR, bad port...
EXIT_PERMISSION = 3  # not root / missing CAP_BPF or CAP_NET_ADMIN
EXIT_DOCKER = 4  # Docker engine not reachable
EXIT_KERNEL = 5  # no bpffs, no headers, program refused
EXIT_STORE = 6  # rule store corrupt or locked
