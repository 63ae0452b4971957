"""A deployed SuperNode's ClientApp executor: one long-lived process that runs every ClientApp
task of its SuperNode in process, instead of a fresh ``flwr-clientapp`` process per message.

Flower 1.41's SuperNode in its default (``subprocess``) isolation starts ``flower-superexec``,
which starts one ``flwr-clientapp`` process per message: a Python interpreter, Flower's imports
and the app's installation, ~3 s each on a small CPU before the ClientApp sees the message.
Started with ``--isolation process``, the SuperNode leaves that to an outside process: this one.
It polls the SuperNode's Runtime API for ClientApp tasks (``AcquireTask``, every ``POLL_S``) and
runs each as ``flwr-clientapp`` would: pull the message and context, call the ClientApp, push
the reply and the context back, with a heartbeat while the task runs. The app of a FAB is
installed and loaded once and kept for the next messages of the run.

The Runtime API listens on loopback; a shared secret (``--superexec-auth-secret-file``, given to
both processes) signs the task requests, so no other local process can take the node's tasks.
The executor ends when its SuperNode's process does (``--parent-pid``), on SIGTERM or Ctrl-C.

This module imports Flower and the standard library only: the ClientApp it runs relays to the
node's worker (``fedpeft.engine.flower_worker``), which holds the model and the rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import MAX_RETRY_DELAY, ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

# How often an idle executor asks its SuperNode for a task. The SuperNode itself asks the
# SuperLink for messages only every 3 s when idle (Flower 1.41, fixed), so a quarter second adds
# little latency; measured idle on 2 cores, polling every 0.05 s cost 6.7% of a core per node
# (SuperNode and executor together), every 0.25 s 1.6% (a loopback federation of 5 nodes: a third
# of a core, then a twelfth).
POLL_S = 0.25
# A task's message can be handed out before the SuperNode holds all of its tensors; Flower's
# ClientApp process waits 1 s, 2 s, ... between tries for one (its start hides that), we wait
# 0.05 s doubling to 2 s.
PULL_BACKOFF_S = (0.05, 2.0)
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the request the shared secret signs

log = logging.getLogger("fedpeft.executor")

# When the task now running was acquired (time.monotonic()), None outside a task: the ClientApp
# reports the seconds from there to its call as its "start" (``fedpeft.engine.flower_client``).
acquired_at: float | None = None
# The SuperNode this executor serves (``--parent-pid``): the node's worker ends with it.
node_pid: int | None = None


class Refused(RuntimeError):
    """The SuperNode refused the executor's request (a wrong secret, an expired task)."""


def retries() -> RetryInvoker:
    """Flower's HTTP retries (transport errors and 502/503/504, backing off up to
    ``MAX_RETRY_DELAY``), except that any other HTTP error is raised to the caller: Flower's own
    invoker answers a 401 by interrupting its process, which ends a one-message ClientApp
    process but would end this executor over one expired task."""

    def give_up(err: Exception) -> bool:
        if isinstance(err, httpx.HTTPStatusError):
            return err.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=None,
        should_giveup=give_up,
    )


def task_age_s() -> float | None:
    """Seconds since the executor acquired the task now running; None outside an executor."""
    return None if acquired_at is None else time.monotonic() - acquired_at


class AppCache:
    """ClientApps by FAB hash: each FAB is installed and its app loaded once per process."""

    def __init__(self) -> None:
        self.apps: dict[str, ClientApp] = {}
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def get(self, fab, run) -> ClientApp:
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            self.apps[fab.hash_str] = self._load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def pull_input(client: RuntimeHttpClient):
    """The task's message, context, run and FAB (``flwr-clientapp``'s ``pull_task_input``, with
    ``PULL_BACKOFF_S`` between tries for a tensor the SuperNode does not hold yet)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, run_id = Node(node_id=context.node_id), context.run_id
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF_S[0],
        backoff_cap=PULL_BACKOFF_S[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context, run_from_proto(res.run), fab_from_proto(res.fab)


def run_task(address: str, token: str, apps: AppCache, insecure: bool = True) -> bool:
    """One ClientApp task, as ``flwr-clientapp`` runs it, in this process. Returns whether the
    ClientApp answered; its failure is answered with an error message and logged, as Flower's
    own process does, and the executor goes on with the next task."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retries(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_input(client)
        app = apps.get(fab, run)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # answered as flwr-clientapp answers it, then the next task
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = f"{type(err)}:<'{err}'>"
        if isinstance(err, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = "An exception was raised when attempting to load `ClientApp`"
        log.error("ClientApp raised an exception", exc_info=err)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001 - the SuperNode times the task out
            log.error("Failed to push the reply", exc_info=err)
            status = SubStatus.FAILED
        push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def warm_worker(supernode: int) -> None:
    """Start the node's worker (``fedpeft.engine.flower_worker``) in the background, so that its
    imports are done before the node's first message; nothing when the worker is turned off
    (``FEDPEFT_NODE_WORKER=0``) or left to the first message (``FEDPEFT_NODE_WARM=0``, the
    benchmark's baseline). A failure here is only logged: the first message starts the worker
    again and reports what goes wrong."""
    from fedpeft.engine.flower_client import use_worker
    from fedpeft.engine.flower_worker import NodeWorker

    if not use_worker() or os.environ.get("FEDPEFT_NODE_WARM", "1") == "0":
        return

    def start() -> None:
        try:
            NodeWorker(supernode).warm()
        except Exception as err:  # noqa: BLE001 - the first message tries again
            log.warning("the node's worker did not start ahead of the first message: %s", err)

    threading.Thread(target=start, name="warm-worker", daemon=True).start()


def serve(
    address: str,
    secret: bytes | None = None,
    parent_pid: int | None = None,
    poll_s: float = POLL_S,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Take the SuperNode's ClientApp tasks one at a time until ``stop()`` (or the end of the
    process: parent gone, SIGTERM, Ctrl-C)."""
    global acquired_at, node_pid
    node_pid = parent_pid
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # raises SIGINT here once the SuperNode is gone
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retries(),
    )
    apps = AppCache()
    if parent_pid is not None:
        warm_worker(parent_pid)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    try:
        while not stop():
            try:
                got = client.AcquireTask(request)
            except httpx.HTTPStatusError as err:
                code = err.response.status_code
                why = "its secret differs from the SuperNode's" if code == 401 else f"HTTP {code}"
                raise Refused(f"the SuperNode at {address} refused the executor: {why}") from None
            if not (got.HasField("task") and got.token):
                time.sleep(poll_s)
                continue
            acquired_at = time.monotonic()
            try:
                run_task(address, got.token, apps)
            finally:
                acquired_at = None
    finally:
        client.close()


def execute(args: argparse.Namespace) -> int:
    """``fedpeft flower executor``: serve until the SuperNode ends (or SIGTERM, Ctrl-C); 2 when
    the secret cannot be read or the SuperNode refuses it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedpeft-executor %(message)s")
    secret = None
    if args.superexec_auth_secret_file:
        try:
            secret = Path(args.superexec_auth_secret_file).read_bytes()
        except OSError as err:
            print(f"error: cannot read the executor's secret: {err}", file=sys.stderr)
            return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll

    def stop(_signum: int, _frame: object) -> None:
        """End now: the executor holds nothing worth a graceful exit (the node's worker keeps the
        model, rows and state; a task cut short is timed out by its round), and a request in
        Flower's retry loop to a SuperNode that is gone would wait through every retry."""
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also how Flower's parent monitor says the node ended
    try:
        serve(args.runtime_api_address, secret, args.parent_pid)
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
