"""params.yaml ``report:`` as a frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from d2v.config import ConfigError


@dataclass(frozen=True)
class ReportConfig:
    """params.yaml ``report:``: how the benchmark report is rendered and published."""

    primary_metric: str = "accuracy"
    """Metric the "What this shows" paragraph leads with (every metric found is tabled)."""
    dpi: int = 100
    """Resolution of the PNG figures (fixed so reruns are byte-identical)."""
    wandb_report: Literal["auto", "never"] = "auto"
    """``auto``: publish a W&B Report (wandb-workspaces) when ``tracking.mode`` is online; ``never``: not."""
    publish_timeout_s: float = 60.0
    """Give up publishing the W&B Report after this long (saving retries forever without a server)."""

    def __post_init__(self) -> None:
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"dpi must be an integer in [30, 600], got {self.dpi}")
        if self.publish_timeout_s <= 0:
            raise ConfigError(f"publish_timeout_s must be > 0, got {self.publish_timeout_s}")
