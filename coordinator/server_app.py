"""The Flower ServerApp of the coordinator (component `coordinator.server_app:app`).

Flower's SuperExec runs it in its own process (Flower docs, "Flower Architecture":
SuperLink → SuperExec → ServerApp), not in the coordinator daemon, so everything it needs
arrives through the run config (coordinator/flwr_app/pyproject.toml `[tool.flwr.app.config]`,
filled by `coordinator.config.run_config`): the state folder (SQLite + adapter files, shared
with the daemon) and the path of the coordinator's signing key. It runs `RuvStrategy` for
`num-rounds` rounds, each bounded by `round-timeout`.
"""

import logging
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from coordinator.config import bank_rules, parse_byzantine_f
from coordinator.store import Store
from coordinator.strategy import RuvStrategy, StrategySettings
from federation import load_private_key

app = ServerApp()


def settings_from_run_config(run_config: dict[str, Any]) -> StrategySettings:
    """StrategySettings from the run config keys written by `config.run_config`."""
    c = run_config
    return StrategySettings(
        coordinator_address=str(c["coordinator-address"]),
        coordinator_tls=bool(c["coordinator-tls"]),
        round_timeout=float(c["round-timeout"]),
        wait_nodes_s=float(c["wait-nodes"]),
        min_nodes=int(c["min-nodes"]),
        fraction=float(c["fraction"]),
        quorum=int(c["quorum"]),
        byzantine_f=parse_byzantine_f(c["byzantine-f"], "byzantine-f"),
        rules=bank_rules({b: str(c[f"rule-{b}"]) for b in ("coarse", "domain", "fine")}),
        max_norm=float(c["max-norm"]),
        density=float(c["density"]),
        local_steps=int(c["local-steps"]),
        learning_rate=float(c["learning-rate"]),
        clip_norm=float(c["clip-norm"]),
        dp_noise=float(c["dp-noise"]),
        dp_delta=float(c["dp-delta"]),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds against the state folder named in the run config."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    c = context.run_config
    store = Store(str(c["state-dir"]))
    try:
        strategy = RuvStrategy(
            store, load_private_key(str(c["key-file"])), settings_from_run_config(dict(c))
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=int(c["num-rounds"]),  # type: ignore[arg-type]
            timeout=float(c["round-timeout"]),  # type: ignore[arg-type]
        )
    finally:
        store.close()
