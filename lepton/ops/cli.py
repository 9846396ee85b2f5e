"""The ``lepton`` command line: one subcommand per role, plus the operator commands (``up``, ``status``,
``scale``, ``checkpoint``, ``export``, ``certs``, ``healthcheck``, ...).

Only this module reads flags; it builds settings and hands them to each role's ``serve``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any

import structlog

# Read once, when grpc is first imported, so before anything below imports it. Lepton never uses gRPC
# across a fork, and with fork support on, grpcio >= 1.81 can abort a child that `lepton up` forks
# (subprocess with preexec_fn) before it execs, when the launcher's own calls are in flight
# (grpc/grpc#43055: "epoll_wait error: Bad file descriptor", exit -6).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from lepton.config import ASYNC_LR_SCALINGS, LR_SCHEDULES, MODES, TASKS, JobSpec, job_from_mapping, read_job_file
from lepton.errors import ConfigError, LeptonError
from lepton.limits import DEFAULT_IDLE_S, DEFAULT_LIFETIME_S, DEFAULT_LIMITS
from lepton.logs import configure_logging
from lepton.ops.healthcheck import add_arguments as add_healthcheck_arguments
from lepton.process import (
    EXIT_CONFIG,
    EXIT_LOST_CONTACT,
    ServiceOptions,
    stop_event_on_signals,
    write_ready_file,
)
from lepton.security import Security, check_exposure, load_security

# flag -> JobSpec field
_JOB_FLAGS: dict[str, tuple[str, type, str]] = {
    "--dataset": (
        "dataset", str,
        "built-in dataset (digits, diabetes; synthetic-image and synthetic-text bring their recommended "
        "model, epochs, batch size, optimizer and lr), package.module:factory (also a module in the current "
        "directory) or path/to/file.py:factory",
    ),
    "--model": (
        "model", str,
        "built-in model (mlp, embedding-bag), package.module:factory (also a module in the current "
        "directory) or path/to/file.py:factory",
    ),
    "--loss": ("loss", str, "training loss: cross_entropy, nll, bce_with_logits, mse, l1, or package.module:factory"),
    "--task": ("task", str, f"what the job learns, which decides its metrics: {', '.join(TASKS)}"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--batch-size": ("batch_size", int, "samples per worker step"),
    "--lr": ("lr", float, "learning rate"),
    "--optimizer": ("optimizer", str, "torch.optim class name (sgd, adam, adamw, ...)"),
    "--mode": ("mode", str, f"consistency mode: {' or '.join(MODES)}"),
    "--shards": ("shards_per_epoch", int, "shards the training set is split into per epoch"),
    "--seed": ("seed", int, "seed of model initialisation and shuffling"),
    "--heartbeat-interval": ("heartbeat_interval_s", float, "seconds between heartbeats"),
    "--heartbeat-timeout": ("heartbeat_timeout_s", float, "seconds of silence before a member is declared dead"),
    "--checkpoint-every": ("checkpoint_every_steps", int, "parameter servers checkpoint every N updates (0: never)"),
    "--lease-timeout": ("lease_timeout_s", float, "seconds a shard lease lives without renewal (heartbeats, progress)"),
    "--staleness": ("staleness", int, "ssp: pushes a worker may run ahead of the slowest (0: lockstep)"),
    "--lr-schedule": ("lr_schedule", str, f"learning-rate schedule, in server updates: {', '.join(LR_SCHEDULES)}"),
    "--async-lr-scaling": (
        "async_lr_scaling", str,
        f"async: {' or '.join(ASYNC_LR_SCALINGS)}; staleness: a push staler than (workers - 1) gets its lr "
        "scaled by (workers - 1) / staleness (default)",
    ),
}
# JSON-object flags: flag -> JobSpec field.
_JSON_FLAGS = {"--optimizer-kwargs": "optimizer_kwargs", "--lr-schedule-kwargs": "lr_schedule_kwargs"}


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "job (flags override --job FILE, which overrides the data set's recommended settings, "
        "then the defaults)"
    )
    g.add_argument("--job", metavar="FILE", help="job TOML file (JobSpec fields as keys)")
    for flag, (_, typ, text) in _JOB_FLAGS.items():
        g.add_argument(flag, type=typ, default=None, help=text)
    g.add_argument(
        "--optimizer-kwargs",
        metavar="JSON",
        default=None,
        help='extra optimizer arguments as a JSON object, e.g. \'{"momentum": 0.9}\'',
    )
    g.add_argument(
        "--lr-schedule-kwargs",
        metavar="JSON",
        default=None,
        help='schedule arguments as a JSON object, counts in updates: step {"step_size": 100, "gamma": 0.5}, '
        'cosine {"t_max": 1000, "eta_min": 0.0}',
    )


def job_from_args(args: argparse.Namespace, **overrides: Any) -> JobSpec:
    """The job of the flags, the ``--job`` file, the data set's recommended settings and JobSpec's
    defaults, in that order of precedence (``lepton.config.job_from_mapping``)."""
    values: dict[str, Any] = read_job_file(args.job) if args.job else {}
    for flag, (name, _, _) in _JOB_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            values[name] = value
    for flag, name in _JSON_FLAGS.items():
        text = getattr(args, flag[2:].replace("-", "_"))
        if text:
            try:
                values[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{flag} is not JSON: {exc}") from exc
    values.update(overrides)
    spec = job_from_mapping(values)
    # A factory file is named absolutely from here on: every process of the job (children of
    # `lepton up`, workers told by the coordinator) loads the same file whatever its directory.
    from lepton.factories import absolute_factory

    return spec.replace(
        model=absolute_factory(spec.model), dataset=absolute_factory(spec.dataset), loss=absolute_factory(spec.loss)
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("--log-level", default="info")


def _add_client_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (tokens only from files or LEPTON_TOKEN, never flags)")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="CA bundle: verify servers (and, on servers, require client certificates)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="this process's certificate chain")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="this process's private key")
    g.add_argument("--token-file", default=None, metavar="FILE", help="bearer token to send (default: $LEPTON_TOKEN)")


def _add_service(p: argparse.ArgumentParser, server: bool = True) -> None:
    _add_client_security(p)
    if server:
        p.add_argument("--auth-file", default=None, metavar="TOML", help="token table to check (default: $LEPTON_AUTH_FILE; none: no authentication)")
        p.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off")
        p.add_argument(
            "--insecure", action="store_true",
            help="allow plaintext on a non-loopback --listen address (refused without it: exit 2)",
        )
        p.add_argument(
            "--rpc-limit", action="append", default=[], metavar="CLASS=LIMIT[:PER_PEER]",
            help="concurrent calls a class admits, and from one connection (classes: heartbeat, control, "
            "read, watch, data, steps; repeatable); beyond them: RESOURCE_EXHAUSTED",
        )
        p.add_argument(
            "--stream-idle-timeout", type=float, default=None, metavar="SECONDS",
            help=f"end a request stream (Push, PushPull) whose next message takes longer (default {DEFAULT_IDLE_S:g})",
        )
        p.add_argument(
            "--stream-lifetime", type=float, default=None, metavar="SECONDS",
            help=f"end a WatchJob or health Watch stream this long after it began (default {DEFAULT_LIFETIME_S:g})",
        )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: the --listen host, else 127.0.0.1)")


def service_options(args: argparse.Namespace) -> ServiceOptions:
    security = load_security(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        token_file=args.token_file,
        auth_file=getattr(args, "auth_file", None),
    )
    listen = getattr(args, "listen", None)
    if listen is not None and check_exposure(listen, security, getattr(args, "insecure", False)):
        structlog.get_logger("lepton.security").warning(
            "serving_plaintext_to_the_network", listen=listen, why="--insecure"
        )
    listen_host = getattr(args, "listen", "127.0.0.1:0").rsplit(":", 1)[0] or "127.0.0.1"
    return ServiceOptions(
        security=security,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host or listen_host,
        reflection=not getattr(args, "no_reflection", False),
        limits=DEFAULT_LIMITS.configured(
            getattr(args, "rpc_limit", None) or (),
            getattr(args, "stream_idle_timeout", None),
            getattr(args, "stream_lifetime", None),
        ),
    )


def _add_member(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--id", default="", help="member id to (re)register under; default: assigned")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton", description="Distributed PyTorch training over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of one job")
    c.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="port 0 picks a free port")
    c.add_argument("--parameter-servers", type=int, default=None, help="servers the job waits for")
    c.add_argument("--state-dir", default=None, help="durable job state (SQLite); a restart on it resumes the job")
    c.add_argument("--ready-file", default=None, help="write {address, pid} as JSON here once serving")
    _add_job_flags(c)
    _add_service(c)
    _add_common(c)

    s = sub.add_parser("ps", help="run a parameter server")
    _add_member(s)
    s.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    s.add_argument("--advertise", default="", metavar="HOST:PORT", help="address workers dial, if not --listen")
    s.add_argument("--state-dir", default=None, help="checkpoints of this server; a restart with the same --id and --state-dir restores the newest")
    s.add_argument("--ready-file", default=None)
    _add_service(s)
    _add_common(s)

    w = sub.add_parser("worker", help="run a worker")
    _add_member(w)
    w.add_argument("--ready-file", default=None, help="write {metrics, pid} as JSON here once started")
    w.add_argument(
        "--step-delay", type=float, default=0.0, metavar="SECONDS",
        help="test/demo hook, not for production: sleep this long before each push and before evaluating, "
        "making this worker slow on purpose (default 0)",
    )
    _add_service(w, server=False)
    _add_common(w)

    u = sub.add_parser("up", help="run a whole local cluster (coordinator, servers, workers) and train")
    u.add_argument("--ps", type=int, default=2, help="parameter servers (default 2)")
    u.add_argument("--workers", type=int, default=3, help="workers (default 3)")
    u.add_argument(
        "--max-workers", type=int, default=None,
        help="most workers `lepton scale` may ask for (default: max(--workers, 8))",
    )
    u.add_argument("--coordinator-port", type=int, default=0, help="coordinator port (default: a free one)")
    u.add_argument("--state-dir", default=None, help="logs and state of every child (default: a temp dir)")
    u.add_argument("--report", default=None, metavar="PATH", help="write the JSON report here")
    u.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    u.add_argument("--secure", action="store_true", help="TLS (mutual) and role tokens on every service, made fresh in the state dir")
    u.add_argument(
        "--worker-delay", type=float, default=0.0, metavar="SECONDS",
        help="test/demo hook: worker-0 alone (also when restarted) sleeps this long before each push "
        "(`lepton worker --step-delay`), so one worker is slow on purpose (default 0)",
    )
    _add_job_flags(u)
    _add_common(u)

    sc = sub.add_parser("scale", help="grow or shrink the workers of a running `lepton up`")
    sc.add_argument("--state-dir", required=True, help="the --state-dir of the running lepton up")
    sc.add_argument("--workers", type=int, required=True, help="worker count wanted (1 to its --max-workers)")
    sc.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for lepton up to acknowledge (default 30)")

    st = sub.add_parser("status", help="show a running job as the coordinator sees it")
    st.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _add_client_security(st)

    k = sub.add_parser("cancel", help="end a running job as FAILED (needs an admin token)")
    k.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    k.add_argument("--reason", required=True)
    _add_client_security(k)

    cp = sub.add_parser("checkpoint", help="ask every parameter server for a coordinated checkpoint (needs an admin token)")
    cp.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    cp.add_argument("--reason", default="", help="recorded in the manifest")
    cp.add_argument("--wait", action="store_true", help="wait until every server has written its file")
    cp.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    _add_client_security(cp)

    ex = sub.add_parser("export", help="merge a checkpoint into one plain PyTorch state_dict file")
    ex.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="a `lepton up --state-dir`, a coordinator --state-dir, or a manifest JSON file")
    ex.add_argument("--out", required=True, metavar="PATH", help="where to torch.save the state_dict")
    ex.add_argument("--id", default="", help="checkpoint id (default: the newest complete one)")

    hc = sub.add_parser("healthcheck", help="exit 0 if a server answers SERVING to grpc.health.v1 Check, else 1")
    add_healthcheck_arguments(hc)

    ce = sub.add_parser("certs", help="make a development CA, a certificate for every service, and role and member tokens (files 0600)")
    ce.add_argument("--out", required=True, help="directory to write into")
    ce.add_argument("--hosts", default="localhost,127.0.0.1", help="comma-separated DNS names and IPs the certificate covers")
    ce.add_argument("--parameter-servers", type=int, default=2, help="member tokens ps-0.token... to make (default 2)")
    ce.add_argument("--workers", type=int, default=3, help="member tokens worker-0.token... to make (default 3)")
    return parser


def _client_security(args: argparse.Namespace) -> Security:
    return load_security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, token_file=args.token_file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"lepton {args.command}: {exc}", file=sys.stderr, flush=True)
        # A launcher waiting on the ready file (`lepton up`) reads the refusal there.
        write_ready_file(getattr(args, "ready_file", None), error=str(exc))
        return EXIT_CONFIG
    finally:
        # The interpreter's collections at exit walk every object torch, the data set and gRPC made:
        # seconds on a busy machine, during which a supervisor's SIGTERM finds the default handler
        # restored (exit -15). Nothing left needs collecting, so exit without walking them.
        gc.freeze()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        from lepton.ops.status import show_status

        return show_status(args.coordinator, as_json=args.json, security=_client_security(args))
    if args.command == "cancel":
        from lepton.ops.status import cancel_job

        return cancel_job(args.coordinator, args.reason, security=_client_security(args))
    if args.command == "checkpoint":
        from lepton.ops.checkpoint_request import request_checkpoint

        return request_checkpoint(
            args.coordinator, args.reason, wait_s=args.timeout if args.wait else None, security=_client_security(args)
        )
    if args.command == "export":
        from lepton.ops.export import export_checkpoint

        result = export_checkpoint(args.checkpoint, args.out, args.id)
        print(
            f"exported {result.checkpoint_id} ({len(result.tensors)} tensors, versions "
            f"{', '.join(f'{s}@{v}' for s, v in result.versions.items())}) to {result.out}"
        )
        return 0
    if args.command == "scale":
        from lepton.errors import DeadlineExceeded
        from lepton.ops.scale import request_scale

        try:
            before, after = request_scale(args.state_dir, args.workers, args.timeout)
        except DeadlineExceeded as exc:
            print(f"lepton scale: {exc}", file=sys.stderr)
            return EXIT_LOST_CONTACT
        print(f"workers: {before} -> {after}")
        return 0
    if args.command == "healthcheck":
        from lepton.ops.healthcheck import probe

        if args.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        return probe(args)
    if args.command == "certs":
        from lepton.ops.certs import make_dev_pki

        if args.parameter_servers < 0 or args.workers < 0:
            raise ConfigError("--parameter-servers and --workers must be >= 0")
        files = make_dev_pki(
            args.out, [h.strip() for h in args.hosts.split(",") if h.strip()], args.parameter_servers, args.workers
        )
        for role, path in files.items():
            print(f"{role:<12} {path}")
        return 0
    if args.command == "up":
        from lepton.ops.cluster import Cluster
        from lepton.ops.launcher import run_up

        spec = job_from_args(args, parameter_servers=args.ps)
        if args.workers < 1 or args.ps < 1:
            raise ConfigError("--workers and --ps must be >= 1")
        cluster = Cluster(
            spec=spec,
            workers=args.workers,
            max_workers=args.max_workers,
            coordinator_port=args.coordinator_port,
            state_dir=args.state_dir,
            log_format=args.log_format,
            secure=args.secure,
            worker_delay_s=args.worker_delay,
        )
        configure_logging(args.log_format if args.log_format != "auto" else "console", args.log_level, role="up")
        return run_up(cluster, report_path=args.report, timeout_s=args.timeout)
    configure_logging(args.log_format, args.log_level, role=args.command)
    stop = stop_event_on_signals()
    if args.command == "coordinator":
        from coordinator.main import serve as serve_coordinator

        overrides = {} if args.parameter_servers is None else {"parameter_servers": args.parameter_servers}
        spec = job_from_args(args, **overrides)
        return serve_coordinator(
            spec, args.listen, stop, ready_file=args.ready_file, options=service_options(args), state_dir=args.state_dir
        )
    if args.command == "ps":
        from ps_server.main import serve as serve_ps

        return serve_ps(
            args.coordinator,
            args.listen,
            stop,
            advertise=args.advertise,
            member_id=args.id,
            ready_file=args.ready_file,
            options=service_options(args),
            state_dir=args.state_dir,
        )
    if args.command == "worker":
        from worker.main import serve as serve_worker

        return serve_worker(
            args.coordinator, stop, member_id=args.id, ready_file=args.ready_file, options=service_options(args),
            step_delay_s=args.step_delay,
        )
    raise AssertionError(args.command)


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except LeptonError as exc:
        print(f"lepton: {exc}", file=sys.stderr)
        sys.exit(EXIT_LOST_CONTACT)
