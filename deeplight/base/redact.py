"""What deeplight prints or logs carries no credential: `user:password@` removed from URLs, known secrets masked.

    redact("http://alice:pw@mlflow.internal:5000")  ->  "http://***@mlflow.internal:5000"

Put MLflow credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD rather than in the tracking URI;
a URI that carries them is cleaned before MLflow sees it (`deeplight.ops.tracking.tracking_uri`).
"""

from __future__ import annotations

import os
import re
from typing import Any

URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def redact(value: Any) -> str:
    """A value as a string safe to print or log: `user:password@` removed from URLs, known secrets masked."""
    text = URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", str(value))
    for var in SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
