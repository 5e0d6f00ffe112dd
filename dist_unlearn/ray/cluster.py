"""A Ray cluster started by a batch script (``slurm/ray_cluster.sbatch``): wait until it is up.

``python -m dist_unlearn.ray.cluster wait HOST:PORT --nodes N --timeout SECONDS`` returns once the
cluster at ``HOST:PORT`` has ``N`` alive nodes (exit 0; it prints their addresses and resources), or
exits 1 after ``SECONDS`` with the count it saw. The sbatch template calls it after starting the
head and again after starting the workers.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def wait_for_nodes(address: str, nodes: int, timeout: float) -> tuple[dict[str, float], list[str]]:
    """Block until the Ray cluster at ``address`` has ``nodes`` alive nodes; returns its resources and
    the alive nodes' addresses (sorted).

    Raises ``TimeoutError`` when that does not happen within ``timeout`` seconds.
    """
    import ray

    deadline = time.monotonic() + timeout
    while not _port_open(address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray head answers at {address} after {timeout:.0f} s")
        time.sleep(1)
    while True:  # the port opens before the GCS answers; on a busy node connecting can take a while
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
            break
        except (ConnectionError, RuntimeError) as exc:
            ray.shutdown()
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not connect to the Ray head at {address}: {exc}") from exc
            time.sleep(2)
    try:
        alive: list[str] = []
        while time.monotonic() <= deadline:
            alive = sorted(node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive"))
            if len(alive) >= nodes:
                return {key: float(value) for key, value in ray.cluster_resources().items()}, alive
            time.sleep(1)
        raise TimeoutError(f"Ray cluster at {address} has {len(alive)} of {nodes} nodes after {timeout:.0f} s")
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_unlearn.ray.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="wait until the cluster at ADDRESS has --nodes alive nodes")
    wait.add_argument("address", help="HOST:PORT of the Ray head (GCS)")
    wait.add_argument("--nodes", type=int, default=1)
    wait.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    try:
        resources, addresses = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as exc:
        print(f"dist-unlearn: {exc}", file=sys.stderr)
        return 1
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    nodes = f"{len(addresses)} node(s) ({', '.join(addresses)})"
    print(f"dist-unlearn: ray cluster at {args.address}: {nodes}, {cpus:g} CPUs, {gpus:g} GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
