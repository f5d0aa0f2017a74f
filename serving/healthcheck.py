"""The container HEALTHCHECK: exit 0 when ``/v2/health/ready`` answers 200, else 1.

Standard library only, and configured by the same ``DUALDEPLOY_*`` variables as the
server, so it follows the port and TLS settings of the container it checks.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Probe the local server's readiness once."""
    port = os.environ.get("DUALDEPLOY_PORT", "8000")
    tls = bool(os.environ.get("DUALDEPLOY_TLS_CERT"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/health/ready"
    # The probe talks to this very container over loopback; the certificate names the
    # service, not 127.0.0.1, so it is not verified here.
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
