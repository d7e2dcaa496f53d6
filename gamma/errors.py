"""User-facing errors.

Every problem caused by the user's input (a bad path, a corrupt file, an
unsupported architecture, a bad option) is raised as :class:`GammaError`.
The CLI prints ``gamma: error: <message>`` as one line on stderr and exits
with status 2.  Library callers catch it like any exception.
"""


class GammaError(Exception):
    """A problem with the user's input; the message is one line, meant for people."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnsupportedOp(GammaError):
    """A bound method has no rule for an op (never silently falls back)."""

    def __init__(self, op: str, method: str, node: str = ""):
        where = f" (node {node})" if node else ""
        super().__init__(f"method '{method}' has no rule for op '{op}'{where}")
        self.op, self.method, self.node = op, method, node
