"""Optisoft: the practice database stays on the practice's own Windows server, and the Optisoft
Connector there connects OUT over HTTPS to Optisoft's relay. NVC talks to the relay only.

- `OptisoftRelay` (`relay.py`): the relay, a real HTTP server on loopback.
- `OptisoftConnector` (`sandbox.py`): a handle on one connector, a real separate OS process
  (`connector.py`) that long-polls the relay and runs named operations on the practice database.
- `OptisoftSandbox` (`sandbox.py`): relay + per practice a seeded database (`practice_db.py`) and
  its connector, with the inspection hooks every PMS sandbox has.

`python -m sandboxes.optisoft demo` serves one practice until Ctrl-C.
"""

from sandboxes.optisoft.relay import OptisoftRelay
from sandboxes.optisoft.sandbox import ConnectorGone, OptisoftConnector, OptisoftSandbox

__all__ = ["ConnectorGone", "OptisoftConnector", "OptisoftRelay", "OptisoftSandbox"]
