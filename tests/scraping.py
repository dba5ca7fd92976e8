"""Reading a server's Prometheus ``/metrics`` endpoint over HTTP."""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["scrape"]


class _Metered(Protocol):
    @property
    def metrics_port(self) -> int: ...


def scrape(server: _Metered, port: int | None = None) -> dict[str, float]:
    """Every sample of ``server``'s endpoint (or the one on ``port``) as
    ``name{label="value",...}``, plus each name summed over its labels."""
    port = port or server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] += sample.value
            if labels:
                samples[sample.name] += sample.value
    return dict(samples)
