"""A SuperExec for the node's SuperNode that forks each ClientApp from a warm process.

Flower 1.41 runs every ClientApp task in a new ``flwr-clientapp`` process, started by its
``flower-superexec`` after polling the SuperNode's runtime API once a second. Importing
Flower's client stack costs that process about 2.5 CPU-seconds on our 2-core machines, so
a 10-node round paid ~25 CPU-s and 1 s of poll latency per node before any training began
(docs/benchmarks.md, docs/decisions.md).

Flower's ``--isolation process`` mode lets an external executor take those tasks instead.
This one imports Flower's ClientApp runtime and our ClientApp (``node_agent.client_app``)
once, polls ``AcquireTask`` every ``POLL_S``, and for each task forks a child that runs
Flower's own ``run_clientapp`` with the task's token: the same per-task process, the same
runtime API and the same isolation of one task from the next, minus the interpreter start
and the imports (``flwr.supercore.object_ref.load_app`` reuses a module already imported).

The process exits when the SuperNode it serves is gone (``--supernode-pid``); the
SuperNode's supervisor (``node_agent.supernode``) starts it in the SuperNode's process
group, so stopping the group stops it and any ClientApp child in flight.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import httpx

log = logging.getLogger("node_agent.superexec")

POLL_S = 0.25  # AcquireTask polling; Flower's flower-superexec polls every 1 s
EXIT_FAILED = 1


def _supernode_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else (not our case, but not gone)
        return True
    return True


def _reap(children: set[int]) -> None:
    """Collect the exit status of finished ClientApp children; log failures."""
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("ClientApp child %d exited with %d", pid, code)


def _run_task(runtime_api_address: str, token: str) -> None:
    """In the forked child: run one ClientApp task with Flower's runtime, then exit."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    code = EXIT_FAILED
    try:
        run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                      parent_pid=os.getppid(), runtime_dependency_install=False)
        code = 0
    except SystemExit as exc:  # flwr_exit ends every task this way
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
    except BaseException:  # anything else must not unwind into the parent's loop
        log.exception("ClientApp task failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers and its HTTP client


def serve(runtime_api_address: str, supernode_pid: int, poll_s: float = POLL_S) -> int:
    """Take ClientApp tasks from the SuperNode's runtime API until the SuperNode is gone."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    import node_agent.client_app  # noqa: F401 - warm: the forked ClientApps reuse the import

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    children: set[int] = set()
    reachable = True  # log only the first failure of a run of them
    log.info("serving ClientApp tasks of SuperNode %d at %s (poll %.2f s)", supernode_pid,
             runtime_api_address, poll_s)
    try:
        while _supernode_alive(supernode_pid):
            _reap(children)
            try:
                res = client.AcquireTask(request)
            except httpx.TransportError as err:  # the SuperNode's API is not up (yet)
                if reachable:
                    reachable = False
                    log.info("runtime API at %s not reachable yet: %s", runtime_api_address,
                             err)
                time.sleep(poll_s)
                continue
            reachable = True
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:
                    _run_task(runtime_api_address, res.token)
                children.add(pid)
                log.info("task %d: ClientApp forked as %d", res.task.task_id, pid)
            time.sleep(poll_s)
    finally:
        client.close()
    log.info("SuperNode %d is gone; exiting", supernode_pid)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m node_agent.superexec --runtime-api-address HOST:PORT --supernode-pid PID``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's runtime API (its --host:--port)")
    parser.add_argument("--supernode-pid", type=int, required=True,
                        help="exit when this process is gone")
    parser.add_argument("--poll", type=float, default=POLL_S, help="AcquireTask poll, seconds")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll <= 60:
        parser.error(f"--poll must be between 0.01 and 60 seconds, got {args.poll}")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s superexec %(levelname)s %(message)s")
    return serve(args.runtime_api_address, args.supernode_pid, args.poll)


if __name__ == "__main__":
    sys.exit(main())
